"""The streaming tensor engine: plan tensor jobs, then stream them shard by shard into safetensors.

A plan is pure data (``TensorJob`` made of ``Segment``s over input ``TensorInfo``s), so it can be built
and checked before any byte is read. Execution reads each segment in blocks of ``block`` elements with
``pread`` into preallocated buffers, does the float32 math, rounds once, and hands the bytes to a writer
thread that writes, hashes (sha256 per tensor) and, when a shard is closed, reads it back to verify.
Memory therefore stays at a few blocks, whatever the model size; only output headers are held.

The plan types live in ``jobs`` (re-exported here), the writer and hasher threads in ``writer``, the
per-block helpers (fused-kernel calls, input views, checks) in ``blocks``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hf_residual.core import blocks, fp8, fused, kernels
from hf_residual.core import writer as writing
from hf_residual.core.jobs import (
    DEFAULT_SHARD_BYTES,
    BlockReader,
    DecodedInfo,
    Segment,
    ShardPlan,
    Source,
    TensorJob,
    TensorStats,
    is_decoded,
    plan_shards,
    total_bytes,
    write_index,
)
from hf_residual.core.safetensors_io import FLOAT_DTYPES, ITEMSIZE, OutputTensor, encode_header
from hf_residual.errors import NonFiniteError

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_SHARD_BYTES",
    "READ_MODE",
    "Segment",
    "ShardPlan",
    "Source",
    "TensorJob",
    "TensorStats",
    "execute",
    "plan_shards",
    "total_bytes",
    "write_index",
]

# Elements per block: 2^18 (256K) amortises the per-block Python and queue overhead while the fused
# kernel's inputs and output (2 MB) stay near cache size; HF_RESIDUAL_BLOCK_LOG2 overrides (benchmarks).
DEFAULT_BLOCK = 1 << int(os.environ.get("HF_RESIDUAL_BLOCK_LOG2", "18"))
# Blocks the arithmetic may run ahead of the writer (a deeper queue lets it compute while the writer waits
# for an O_DIRECT chunk; HF_RESIDUAL_WRITE_BUFFERS, measured in benchmarks/RESULTS.md).
WRITE_BUFFERS = int(os.environ.get("HF_RESIDUAL_WRITE_BUFFERS", "24"))
# How the fused path reads inputs: "pread" (copy into reused buffers) or "mmap" (map each block).
READ_MODE = os.environ.get("HF_RESIDUAL_READ", "pread")


def execute(
    shards: list[ShardPlan],
    folder: Path,
    *,
    block: int | None = None,
    checksum: str | None = "sha256",
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, TensorStats]:
    """Run every job and write each shard into ``folder``; return per-tensor checksums and norms.

    ``checksum`` is ``"sha256"`` (per-tensor digests for manifests) or None (outputs are still verified:
    every block is read back and compared).
    Raises ``NonFiniteError`` on NaN/Inf in an input or an overflow of the output dtype, and
    ``VerificationError`` if a shard does not read back as written. On error, partially written
    files are left for the caller to discard (the caller writes into a staging folder).
    """
    block = block or DEFAULT_BLOCK
    buffers = kernels.BlockBuffers(block)
    writer = writing.Writer(buffers=WRITE_BUFFERS, block_bytes=block * 8, checksum=checksum)
    writer.start()
    hasher = writing.Hasher(buffers=4, block_bytes=block * 8) if _checks_inputs(shards) else None
    if hasher is not None:
        hasher.start()
    files = writing.Files()
    stats: dict[str, TensorStats] = {}

    def put(kind: str, payload: object = None) -> None:
        if writer.error is not None:
            raise writer.error
        if hasher is not None and hasher.error is not None:
            raise hasher.error
        writer.tasks.put((kind, payload))

    try:
        for shard in shards:
            expected = [out for job in shard.jobs for out in job.outputs]
            put("open", (folder / shard.filename, encode_header(expected)))
            for job in shard.jobs:
                put("tensor", job.out)
                stats[job.out.name] = _run_job(job, files, buffers, writer, put, hasher)
                put("end_tensor")
                if job.quantize is not None:
                    stats[job.quantize.scale.name] = _write_scales(job, stats[job.out.name], writer, put)
                if on_progress:
                    on_progress(job.nbytes)
            if hasher is not None:
                hasher.drain()  # every input checksum of this shard compared before it is closed
            put("close", (folder / shard.filename, expected))
        put("end")
        writer.join()
        if writer.error is not None:
            raise writer.error
    finally:
        if writer.is_alive():
            writer.error = writer.error or RuntimeError("aborted")
            writer.tasks.put(("end", None))
            writer.join()
        if hasher is not None:
            hasher.stop()
        files.close()
    for name, digest in writer.hashes.items():
        stats[name].sha256 = digest
    return stats


def _checks_inputs(shards: list[ShardPlan]) -> bool:
    return any(
        source is not None and source.sha256 is not None
        for shard in shards
        for job in shard.jobs
        for segment in job.segments
        for source in (segment.plus, segment.minus, segment.addend)
    )


def _run_job(
    job: TensorJob,
    files: writing.Files,
    buffers: kernels.BlockBuffers,
    writer: writing.Writer,
    put: Callable[[str, object], None],
    hasher: writing.Hasher | None = None,
) -> TensorStats:
    if job.quantize is not None:
        return _run_quantized(job, files, buffers, writer, put, hasher)
    if job.out.dtype not in FLOAT_DTYPES:
        return _copy_bytes(job, files, writer, put)
    stats = TensorStats(sha256="")
    acc, tmp = buffers.acc, buffers.tmp
    out_dtype = job.out.dtype
    digests = writing.InputDigests(job, hasher)

    decode = _decoder(files, buffers, digests)
    for segment in job.segments:
        kernel = None if job.collect_norms else _fused_kernel(segment, out_dtype)
        step = _step(segment, job.out, buffers.block)
        for start in range(segment.start, segment.stop, step):
            stop = min(segment.stop, start + step)
            count = stop - start
            offset = start - segment.start
            if kernel is not None:
                out = writer.free.get()
                worst = blocks.run_fused(
                    kernel, segment, offset, count, files, buffers, out, out_dtype, digests, READ_MODE, decode
                )
                if kernels.overflows(worst, out_dtype):
                    writer.free.put(out)
                    raise NonFiniteError(
                        blocks.non_finite_message(job, segment, offset, offset + count, files, buffers)
                    )
                put("data", (out, count * ITEMSIZE[out_dtype]))
                continue
            a = acc[:count]
            _compute(job, segment, offset, a, tmp[:count], decode, stats, files, buffers)
            if kernels.overflows(kernels.max_magnitude_bits(a, buffers), out_dtype):
                raise NonFiniteError(
                    blocks.non_finite_message(job, segment, offset, offset + count, files, buffers)
                )
            out = writer.free.get()
            while out is None:  # pragma: no cover - defensive
                out = writer.free.get()
            view = kernels.encode(a, out_dtype, out, buffers)
            put("data", (out, len(view)))
    digests.check()  # compared by the hasher thread; execute() waits for it before closing the shard
    decode.finish()  # encoded inputs: their stored parts' digests
    stats.plus_norm **= 0.5
    stats.minus_norm **= 0.5
    stats.result_norm **= 0.5
    return stats


class _Decode:
    """``decode(source, offset, count, out)``: float32 values of a segment's input, hashed as read.

    An encoded input (``DecodedInfo``: a compressed residual) is read through its codec's block reader,
    opened once per job; ``finish`` (end of the job) has each reader check its stored parts' digests.
    """

    def __init__(
        self, files: writing.Files, buffers: kernels.BlockBuffers, digests: writing.InputDigests
    ) -> None:
        self.files, self.buffers, self.digests = files, buffers, digests
        self.readers: dict[DecodedInfo, BlockReader] = {}

    def __call__(self, source: Source, offset: int, count: int, out: np.ndarray) -> None:
        element = source.start + offset
        if is_decoded(source.info):
            reader = self.readers.get(source.info)
            if reader is None:
                reader = self.readers[source.info] = source.info.decoder.open(self.files.fd)
            reader.read(element, count, out[:count])
            return
        sink = (lambda raw: self.digests.feed(source, element, count, raw)) if source.sha256 else None
        kernels.decode(self.files.fd(source.info.file), source.info, element, count, out, self.buffers, sink)

    def finish(self) -> None:
        for reader in self.readers.values():
            reader.finish()


def _decoder(files: writing.Files, buffers: kernels.BlockBuffers, digests: writing.InputDigests) -> _Decode:
    return _Decode(files, buffers, digests)


def _compute(
    job: TensorJob,
    segment: Segment,
    offset: int,
    a: np.ndarray,
    t: np.ndarray,
    decode: Callable[[Source, int, int, np.ndarray], None],
    stats: TensorStats,
    files: writing.Files,
    buffers: kernels.BlockBuffers,
) -> None:
    """The numpy path: ``a`` = the segment's result for its elements ``offset:offset+len(a)`` in float32."""
    count = a.size
    decode(segment.plus, offset, count, a)
    if job.collect_norms:
        stats.plus_norm += blocks.sum_squares(a)
    if segment.minus is not None:
        decode(segment.minus, offset, count, t)
        if job.collect_norms:
            stats.minus_norm += blocks.sum_squares(t)
        a -= t
        if segment.roundtrip_of is not None:
            stats.inexact += blocks.count_inexact(a, t, segment.roundtrip_of, offset, files, buffers)
    if segment.method is not None:  # ties, dare (core.methods): R changed before alpha
        segment.method.apply(a, segment, offset, decode)
    if segment.alpha != 1.0:
        a *= np.float32(segment.alpha)
    if job.collect_norms:
        stats.result_norm += blocks.sum_squares(a)
    if segment.addend is not None:
        decode(segment.addend, offset, count, t)
        a += t


def _step(segment: Segment, out: OutputTensor, block: int) -> int:
    """Elements per engine block: whole rows when an input is FP8 (one row of scales per run of rows)."""
    scaled = any(
        s is not None and fp8.is_scaled(s.info) for s in (segment.plus, segment.minus, segment.addend)
    )
    cols = out.shape[-1] if len(out.shape) == 2 else 0
    return block // cols * cols if scaled and 0 < cols <= block else block


def _run_quantized(
    job: TensorJob,
    files: writing.Files,
    buffers: kernels.BlockBuffers,
    writer: writing.Writer,
    put: Callable[[str, object], None],
    hasher: writing.Hasher | None = None,
) -> TensorStats:
    """An FP8 output with block scales, one stripe of ``block[0]`` rows at a time (``fp8.Quantize``).

    Each stripe is computed in float32 like any output (numpy path, in engine blocks), then its per-block
    ``amax`` gives the scales (``amax / max finite``, 1.0 for an all-zero block) and the values
    ``x / scale`` are rounded once to FP8 (nearest even, saturating). Memory: one stripe in float32
    (``block[0]`` rows: 7 MB for 14336 columns).
    """
    stats = TensorStats(sha256="")
    digests = writing.InputDigests(job, hasher)
    rows, cols = job.out.shape
    block_rows, block_cols = job.quantize.block
    limit = np.float32(fp8.MAX_FINITE[job.out.dtype])
    scales = np.empty(job.quantize.scale.shape, np.float32)
    stripe = np.empty(min(rows, block_rows) * cols, np.float32)
    col_starts = np.arange(0, cols, block_cols)

    decode = _decoder(files, buffers, digests)
    for first in range(0, rows, block_rows):
        n = min(block_rows, rows - first)
        begin, end = first * cols, (first + n) * cols
        values = stripe[: end - begin]
        for segment in job.segments:  # the parts of this stripe each segment covers, in engine blocks
            lo, hi = max(begin, segment.start), min(end, segment.stop)
            for start in range(lo, hi, buffers.block):
                stop = min(hi, start + buffers.block)
                a = values[start - begin : stop - begin]
                offset = start - segment.start
                _compute(job, segment, offset, a, buffers.tmp[: a.size], decode, stats, files, buffers)
                if kernels.overflows(kernels.max_magnitude_bits(a, buffers), "F32"):
                    raise NonFiniteError(
                        blocks.non_finite_message(job, segment, offset, offset + a.size, files, buffers)
                    )
        matrix = values.reshape(n, cols)
        amax = np.maximum.reduceat(np.abs(matrix).max(axis=0), col_starts)
        scale = amax / limit
        scale[scale == 0] = 1.0  # an all-zero block (or one whose scale would underflow)
        scales[first // block_rows] = scale
        matrix /= np.repeat(scale, block_cols)[:cols]
        codes = fp8.encode(values, job.out.dtype)
        for at in range(0, codes.size, writer.block_bytes):
            chunk = codes[at : at + writer.block_bytes]
            out = writer.free.get()
            np.copyto(out[: chunk.size], chunk)
            put("data", (out, chunk.size))
    digests.check()
    decode.finish()
    stats.plus_norm **= 0.5
    stats.minus_norm **= 0.5
    stats.result_norm **= 0.5
    stats.scales = scales
    return stats


def _write_scales(
    job: TensorJob, stats: TensorStats, writer: writing.Writer, put: Callable[[str, object], None]
) -> TensorStats:
    """The block scales of a quantized job, as the F32 tensor after its weight."""
    put("tensor", job.quantize.scale)
    raw = stats.scales.reshape(-1).view(np.uint8)
    for at in range(0, raw.size, writer.block_bytes):
        chunk = raw[at : at + writer.block_bytes]
        out = writer.free.get()
        np.copyto(out[: chunk.size], chunk)
        put("data", (out, chunk.size))
    put("end_tensor")
    stats.scales = None
    return TensorStats(sha256="")


def _copy_bytes(
    job: TensorJob, files: writing.Files, writer: writing.Writer, put: Callable[[str, object], None]
) -> TensorStats:
    """An integer/bool buffer (``plans.buffer_jobs``): its source's bytes as they are, no arithmetic."""
    (segment,) = job.segments
    source = segment.plus
    if (
        segment.minus is not None
        or segment.addend is not None
        or source.info.dtype != job.out.dtype
        or segment.stop - segment.start != source.info.numel - source.start
    ):  # pragma: no cover - plans only make plain copies of non-float tensors
        raise TypeError(f"{job.out.name!r}: a {job.out.dtype} tensor can only be copied as it is")
    begin = source.info.offset + source.start * source.info.itemsize
    total = job.out.nbytes
    done = 0
    while done < total:
        out = writer.free.get()
        count = min(out.size, total - done)
        kernels.pread_into(files.fd(source.info.file), memoryview(out[:count]), begin + done)
        put("data", (out, count))
        done += count
    return TensorStats(sha256="")


def _fused_kernel(segment: Segment, out_dtype: str):
    """The numba kernel for this segment's shape and dtypes, or None for the numpy path."""
    sources = [s for s in (segment.plus, segment.minus, segment.addend) if s is not None]
    if (
        not fused.AVAILABLE
        or segment.roundtrip_of is not None
        or segment.method is not None
        or out_dtype not in fused.VIEW_DTYPES
        or any(s.info.dtype not in fused.VIEW_DTYPES and not fp8.is_scaled(s.info) for s in sources)
    ):
        return None
    if segment.minus is not None and segment.addend is not None:
        return fused.port_block
    if segment.minus is None and segment.addend is not None:
        return fused.apply_block
    if segment.minus is None and segment.addend is None and segment.alpha == 1.0:
        return fused.copy_block
    return None
