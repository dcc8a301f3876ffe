"""The streaming tensor engine: plan tensor jobs, then stream them shard by shard into safetensors.

A plan is pure data (``TensorJob`` made of ``Segment``s over input ``TensorInfo``s), so it can be built
and checked before any byte is read. Execution reads each segment in blocks of ``block`` elements with
``pread`` into preallocated buffers, does the float32 math, rounds once, and hands the bytes to a writer
thread that writes, hashes (sha256 per tensor) and, when a shard is closed, reads it back to verify.
Memory therefore stays at a few blocks, whatever the model size; only output headers are held.

Math of one segment, in float32, one rounding at the end:
``out = addend + alpha * (plus - minus)``, where ``minus`` and ``addend`` are optional.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_residual import fp8, fused, kernels
from hf_residual.errors import NonFiniteError, VerificationError
from hf_residual.safetensors_io import (
    FLOAT_DTYPES,
    ITEMSIZE,
    OutputTensor,
    TensorInfo,
    encode_header,
    read_header,
    shard_filenames,
    write_shard_index,
)

# Elements per block: 2^18 (256K) amortises the per-block Python and queue overhead while the fused
# kernel's inputs and output (2 MB) stay near cache size; HF_RESIDUAL_BLOCK_LOG2 overrides (benchmarks).
DEFAULT_BLOCK = 1 << int(os.environ.get("HF_RESIDUAL_BLOCK_LOG2", "18"))
# How the fused path reads inputs: "pread" (copy into reused buffers) or "mmap" (map each block).
READ_MODE = os.environ.get("HF_RESIDUAL_READ", "pread")
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Source:
    """A run of elements of an input tensor, starting at element ``start``.

    ``sha256``: the digest the whole input tensor's bytes must have (a residual's, from its manifest).
    The engine hashes the raw bytes as it reads them (no second pass), across every segment that reads
    the tensor, and raises ``VerificationError`` at the end of the tensor's job if they differ, before the
    shard is closed.
    """

    info: TensorInfo
    start: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class Segment:
    """Output elements ``start:stop`` = ``addend + alpha * (plus - minus)``."""

    start: int
    stop: int
    plus: Source
    minus: Source | None = None
    alpha: float = 1.0
    addend: Source | None = None
    # When set, count elements where ``minus + result``, rounded to this source's dtype, is not
    # bit-identical to it: how a float32 residual proves it is lossless.
    roundtrip_of: Source | None = None


@dataclass(frozen=True)
class TensorJob:
    """One output tensor; with ``quantize``, an FP8 tensor followed by its block scales (``quantize.scale``)."""

    out: OutputTensor
    segments: tuple[Segment, ...]
    collect_norms: bool = False
    quantize: fp8.Quantize | None = None

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        return (self.out,) if self.quantize is None else (self.out, self.quantize.scale)

    @property
    def nbytes(self) -> int:
        return sum(out.nbytes for out in self.outputs)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)


@dataclass
class TensorStats:
    """What execution learned about one output tensor."""

    sha256: str
    plus_norm: float = 0.0
    minus_norm: float = 0.0
    result_norm: float = 0.0
    inexact: int = 0
    # An FP8 output's block scales (``TensorJob.quantize``), written as the tensor after it.
    scales: np.ndarray | None = None


def plan_shards(
    jobs: list[TensorJob], prefix: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[ShardPlan]:
    """Group jobs, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.nbytes
    names = shard_filenames(prefix, len(groups))
    return [ShardPlan(name, tuple(group)) for name, group in zip(names, groups, strict=True)]


def write_index(folder: Path, prefix: str, shards: list[ShardPlan], metadata: dict | None = None) -> None:
    """Write ``<prefix>.safetensors.index.json`` (only when there is more than one shard)."""
    weight_map = {out.name: shard.filename for shard in shards for job in shard.jobs for out in job.outputs}
    write_shard_index(folder, prefix, weight_map, sum(s.nbytes for s in shards), metadata)


class _Writer(threading.Thread):
    """Writes blocks to the open shard and reads each one back to compare it with what was meant.

    Runs beside the arithmetic: writes, reads, comparisons and sha256 release the GIL, so this uses the
    second core. Each block is read back (from the page cache) right after it is written and compared
    byte for byte while it is still in memory, which costs less than checksumming every tensor twice;
    sha256 is computed only when a manifest needs it (``checksum="sha256"``). The header is re-parsed
    when the shard is closed.
    """

    def __init__(self, buffers: int, block_bytes: int, checksum: str | None):
        super().__init__(daemon=True, name="hf-residual-writer")
        self.checksum = checksum
        self.block_bytes = block_bytes
        self.tasks: queue.Queue = queue.Queue(maxsize=buffers)
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(np.empty(block_bytes, np.uint8))
        self.hashes: dict[str, str] = {}
        self.error: BaseException | None = None
        self._readback = np.empty(block_bytes, np.uint8)
        # The open shard: written through ``_handle``, read back through ``_read_fd``.
        self._handle = None
        self._read_fd = -1

    def run(self) -> None:
        try:
            self._loop()
        finally:  # "end" after an abort mid-shard, or an error: no descriptor outlives the run
            self._close_files()

    def _close_files(self) -> None:
        handle, read_fd = self._handle, self._read_fd
        self._handle, self._read_fd = None, -1
        try:
            if handle is not None:
                handle.close()
        finally:
            if read_fd >= 0:
                os.close(read_fd)

    def _loop(self) -> None:
        hasher = None
        cursor = 0
        current: OutputTensor | None = None
        while True:
            kind, payload = self.tasks.get()
            if kind == "end":
                return
            if self.error is not None:
                if kind == "data":
                    self.free.put(payload[0])
                continue
            try:
                if kind == "open":
                    path, header = payload
                    self._handle = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by _close_files
                    self._read_fd = os.open(path, os.O_RDONLY)
                    _write_all(self._handle, memoryview(header))
                    cursor = len(header)
                elif kind == "tensor":
                    current = payload
                    hasher = hashlib.sha256() if self.checksum == "sha256" else None
                elif kind == "data":
                    buffer, nbytes = payload
                    view = memoryview(buffer)[:nbytes]
                    _write_all(self._handle, view)
                    self._verify_block(self._read_fd, cursor, buffer[:nbytes], current)
                    if hasher is not None:
                        hasher.update(view)
                    cursor += nbytes
                    self.free.put(buffer)
                elif kind == "end_tensor":
                    self.hashes[current.name] = hasher.hexdigest() if hasher is not None else ""
                elif kind == "close":
                    path, expected = payload
                    self._close_files()
                    _verify_header(path, expected)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
                if kind == "data":
                    self.free.put(payload[0])
                with contextlib.suppress(OSError):  # the first error is the one to report
                    self._close_files()

    def _verify_block(self, fd: int, offset: int, written: np.ndarray, tensor: OutputTensor) -> None:
        back = self._readback[: written.size]
        done = 0
        while done < written.size:
            got = os.preadv(fd, [memoryview(back)[done:]], offset + done)
            if got <= 0:
                raise VerificationError(f"file ends inside tensor {tensor.name!r} when read back")
            done += got
        if not np.array_equal(back, written):
            raise VerificationError(f"bytes of {tensor.name!r} read back differ from those written")


def _write_all(handle, view: memoryview) -> None:
    """Write every byte (an unbuffered write may write fewer than asked)."""
    written = 0
    while written < len(view):
        written += handle.write(view[written:])


def _verify_header(path: Path, expected: list[OutputTensor]) -> None:
    """Re-parse a closed shard's header: names, order, shapes, dtypes and size must match the plan."""
    tensors, _ = read_header(path)
    if list(tensors) != [t.name for t in expected] or any(
        tensors[t.name].shape != t.shape or tensors[t.name].dtype != t.dtype for t in expected
    ):
        raise VerificationError(f"{path}: header read back differs from what was planned")
    last = tensors[expected[-1].name] if expected else None
    if last is not None and last.offset + last.nbytes != path.stat().st_size:
        raise VerificationError(f"{path}: file size differs from what was planned")


class _Files:
    """Open file descriptors of input shards, shared by all jobs."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Hasher(threading.Thread):
    """Hashes input blocks (a residual's, against its manifest) beside the arithmetic and the writer.

    sha256 runs at about the speed of the whole apply pipeline, so done inline it would roughly double
    the time; here it overlaps with the kernels (hashlib releases the GIL). Blocks arrive in a pool
    buffer (the fused path reads straight into one; other paths copy), are hashed in order, and the
    buffer goes back to the pool. A tensor's digest is compared when its "check" arrives; the engine
    waits for all checks (``drain``) before it closes a shard, so a damaged residual never reaches a
    closed shard.
    """

    def __init__(self, buffers: int, block_bytes: int):
        super().__init__(daemon=True, name="hf-residual-hasher")
        self.tasks: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(np.empty(block_bytes, np.uint8))
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            kind, payload = self.tasks.get()
            try:
                if kind == "end":
                    return
                if kind == "data":
                    digest, buffer, nbytes = payload
                    try:
                        if self.error is None:
                            digest.update(memoryview(buffer)[:nbytes])
                    finally:
                        self.free.put(buffer)
                elif kind == "check" and self.error is None:
                    info, digest, done, expected = payload
                    if done != info.numel or digest.hexdigest() != expected:
                        self.error = VerificationError(
                            f"tensor {info.name!r} in {info.file} does not match the sha256 recorded for it "
                            f"in {info.file.parent}'s manifest: the residual is damaged (its data was "
                            "altered or corrupted after it was written). Nothing was written; re-download "
                            "the residual, or re-extract it from the instruct and base models"
                        )
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = self.error or error
            finally:
                self.tasks.task_done()

    def drain(self) -> None:
        """Wait until every block and check handed over is done; raise the first error."""
        self.tasks.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.tasks.put(("end", None))
        self.join()


class _InputDigests:
    """sha256 of the input tensors whose ``Source`` carries an expected digest, fed as blocks are read.

    A tensor's blocks are read in order, possibly over two segments (a residual's rows, then its absolute
    rows), so one running hash per input tensor sees every byte once, as read and before any arithmetic
    touches it. ``check`` (at the end of the tensor's job) hands the comparison to the hasher thread.
    """

    def __init__(self, job: TensorJob, hasher: _Hasher | None) -> None:
        self.hasher = hasher
        # input tensor -> [running hash, next element expected, expected digest]
        self._states: dict[TensorInfo, list] = {}
        for segment in job.segments:
            for source in (segment.plus, segment.minus, segment.addend):
                if source is not None and source.sha256 is not None:
                    self._states.setdefault(source.info, [hashlib.sha256(), 0, source.sha256])

    def take(self) -> np.ndarray:
        """A pool buffer to read a block into; hand it back with ``feed(..., owned=buffer)``."""
        return self.hasher.free.get()

    def feed(self, source: Source, element: int, count: int, raw, owned: np.ndarray | None = None) -> None:
        """``raw``: the stored bytes of ``source.info``'s elements ``element:element+count``.

        ``owned``: the pool buffer ``raw`` lies in (from ``take``), handed over without a copy; else the
        bytes are copied into a pool buffer, since the caller reuses or unmaps its own.
        """
        if source.sha256 is None:
            return
        state = self._states[source.info]
        if element != state[1]:  # pragma: no cover - plans read each checked tensor in order, once
            raise RuntimeError(f"{source.info.name!r} read out of order: element {element}, not {state[1]}")
        nbytes = count * source.info.itemsize
        if owned is None:
            owned = self.take()
            np.copyto(owned[:nbytes], np.frombuffer(raw, np.uint8, count=nbytes))
        self.hasher.tasks.put(("data", (state[0], owned, nbytes)))
        state[1] += count

    def check(self) -> None:
        for info, (digest, done, expected) in self._states.items():
            self.hasher.tasks.put(("check", (info, digest, done, expected)))


def _non_finite_message(
    job: TensorJob, segment: Segment, start: int, stop: int, files: _Files, buffers: kernels.BlockBuffers
) -> str:
    """Say which input holds NaN/Inf, or that the result overflowed the output dtype."""
    for role, source in (("plus", segment.plus), ("minus", segment.minus), ("addend", segment.addend)):
        if source is None:
            continue
        values = buffers.tmp[: stop - start]
        kernels.decode(
            files.fd(source.info.file), source.info, source.start + start, stop - start, values, buffers
        )
        if not np.isfinite(values).all():
            return (
                f"NaN or Inf in input tensor {source.info.name!r} of {source.info.file.parent}"
                f" (as {role}); the checkpoint is damaged: re-download or re-save it"
            )
    return (
        f"the result for {job.out.name!r} overflows {job.out.dtype} (values beyond its range); "
        "lower --alpha, or write the output in a wider dtype"
    )


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
    writer = _Writer(buffers=4, block_bytes=block * 8, checksum=checksum)
    writer.start()
    hasher = _Hasher(buffers=4, block_bytes=block * 8) if _checks_inputs(shards) else None
    if hasher is not None:
        hasher.start()
    files = _Files()
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
    files: _Files,
    buffers: kernels.BlockBuffers,
    writer: _Writer,
    put: Callable[[str, object], None],
    hasher: _Hasher | None = None,
) -> TensorStats:
    if job.quantize is not None:
        return _run_quantized(job, files, buffers, writer, put, hasher)
    if job.out.dtype not in FLOAT_DTYPES:
        return _copy_bytes(job, files, writer, put)
    stats = TensorStats(sha256="")
    acc, tmp = buffers.acc, buffers.tmp
    out_dtype = job.out.dtype
    digests = _InputDigests(job, hasher)

    def decode(source: Source, offset: int, count: int, out: np.ndarray) -> None:
        element = source.start + offset
        sink = (lambda raw: digests.feed(source, element, count, raw)) if source.sha256 else None
        kernels.decode(files.fd(source.info.file), source.info, element, count, out, buffers, sink)

    for segment in job.segments:
        kernel = None if job.collect_norms else _fused_kernel(segment, out_dtype)
        step = _step(segment, job.out, buffers.block)
        for start in range(segment.start, segment.stop, step):
            stop = min(segment.stop, start + step)
            count = stop - start
            offset = start - segment.start
            if kernel is not None:
                out = writer.free.get()
                worst = _run_fused(kernel, segment, offset, count, files, buffers, out, out_dtype, digests)
                if kernels.overflows(worst, out_dtype):
                    writer.free.put(out)
                    raise NonFiniteError(
                        _non_finite_message(job, segment, offset, offset + count, files, buffers)
                    )
                put("data", (out, count * ITEMSIZE[out_dtype]))
                continue
            a = acc[:count]
            _compute(job, segment, offset, a, tmp[:count], decode, stats, files, buffers)
            if kernels.overflows(kernels.max_magnitude_bits(a, buffers), out_dtype):
                raise NonFiniteError(
                    _non_finite_message(job, segment, offset, offset + count, files, buffers)
                )
            out = writer.free.get()
            while out is None:  # pragma: no cover - defensive
                out = writer.free.get()
            view = kernels.encode(a, out_dtype, out, buffers)
            put("data", (out, len(view)))
    digests.check()  # compared by the hasher thread; execute() waits for it before closing the shard
    stats.plus_norm **= 0.5
    stats.minus_norm **= 0.5
    stats.result_norm **= 0.5
    return stats


def _compute(
    job: TensorJob,
    segment: Segment,
    offset: int,
    a: np.ndarray,
    t: np.ndarray,
    decode: Callable[[Source, int, int, np.ndarray], None],
    stats: TensorStats,
    files: _Files,
    buffers: kernels.BlockBuffers,
) -> None:
    """The numpy path: ``a`` = the segment's result for its elements ``offset:offset+len(a)`` in float32."""
    count = a.size
    decode(segment.plus, offset, count, a)
    if job.collect_norms:
        stats.plus_norm += _sum_squares(a)
    if segment.minus is not None:
        decode(segment.minus, offset, count, t)
        if job.collect_norms:
            stats.minus_norm += _sum_squares(t)
        a -= t
        if segment.roundtrip_of is not None:
            stats.inexact += _count_inexact(a, t, segment.roundtrip_of, offset, files, buffers)
    if segment.alpha != 1.0:
        a *= np.float32(segment.alpha)
    if job.collect_norms:
        stats.result_norm += _sum_squares(a)
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
    files: _Files,
    buffers: kernels.BlockBuffers,
    writer: _Writer,
    put: Callable[[str, object], None],
    hasher: _Hasher | None = None,
) -> TensorStats:
    """An FP8 output with block scales, one stripe of ``block[0]`` rows at a time (``fp8.Quantize``).

    Each stripe is computed in float32 like any output (numpy path, in engine blocks), then its per-block
    ``amax`` gives the scales (``amax / max finite``, 1.0 for an all-zero block) and the values
    ``x / scale`` are rounded once to FP8 (nearest even, saturating). Memory: one stripe in float32
    (``block[0]`` rows: 7 MB for 14336 columns).
    """
    stats = TensorStats(sha256="")
    digests = _InputDigests(job, hasher)
    rows, cols = job.out.shape
    block_rows, block_cols = job.quantize.block
    limit = np.float32(fp8.MAX_FINITE[job.out.dtype])
    scales = np.empty(job.quantize.scale.shape, np.float32)
    stripe = np.empty(min(rows, block_rows) * cols, np.float32)
    col_starts = np.arange(0, cols, block_cols)

    def decode(source: Source, offset: int, count: int, out: np.ndarray) -> None:
        element = source.start + offset
        sink = (lambda raw: digests.feed(source, element, count, raw)) if source.sha256 else None
        kernels.decode(files.fd(source.info.file), source.info, element, count, out, buffers, sink)

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
                        _non_finite_message(job, segment, offset, offset + a.size, files, buffers)
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
    stats.plus_norm **= 0.5
    stats.minus_norm **= 0.5
    stats.result_norm **= 0.5
    stats.scales = scales
    return stats


def _write_scales(
    job: TensorJob, stats: TensorStats, writer: _Writer, put: Callable[[str, object], None]
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
    job: TensorJob, files: _Files, writer: _Writer, put: Callable[[str, object], None]
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


class _MappedInputs:
    """Input blocks mapped straight from the page cache (no copy), unmapped as soon as they are used.

    Mapping each block (``MAP_POPULATE``) and unmapping it right after keeps the resident set at a few
    blocks, where one mapping of a whole file would count every touched page in RSS.
    """

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def view(self, fd: int, source: Source, offset: int, count: int) -> np.ndarray:
        info = source.info
        start = info.offset + (source.start + offset) * info.itemsize
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        nbytes = count * info.itemsize
        mapped = mmap.mmap(
            fd,
            nbytes + start - aligned,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=aligned,
        )
        self._maps.append(mapped)
        return np.frombuffer(mapped, dtype=fused.VIEW_DTYPES[info.dtype], count=count, offset=start - aligned)

    def close(self) -> None:
        """Unmap; every array viewing a block must be gone by now."""
        for mapped in self._maps:
            mapped.close()
        self._maps.clear()


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _read_view(
    role: int,
    source: Source,
    offset: int,
    count: int,
    files: _Files,
    buffers: kernels.BlockBuffers,
    digests: _InputDigests,
) -> np.ndarray:
    info = source.info
    if fp8.is_scaled(info):  # FP8: dequantized to float32 here (table and block scales), fused after
        values = buffers.raws[role][: count * 4].view(np.float32)
        element = source.start + offset
        sink = (lambda raw: digests.feed(source, element, count, raw)) if source.sha256 else None
        kernels.decode(files.fd(info.file), info, element, count, values, buffers, sink)
        return values
    # A checked input is read straight into a hasher buffer (no copy): the kernel and the hasher both
    # only read it, and the buffer is not reused before the hasher hands it back.
    owned = digests.take() if source.sha256 is not None else None
    raw = (buffers.raws[role] if owned is None else owned)[: count * info.itemsize]
    kernels.pread_into(
        files.fd(info.file), memoryview(raw), info.offset + (source.start + offset) * info.itemsize
    )
    digests.feed(source, source.start + offset, count, raw, owned)
    return raw.view(fused.VIEW_DTYPES[info.dtype])


def _run_fused(
    kernel,
    segment: Segment,
    offset: int,
    count: int,
    files: _Files,
    buffers: kernels.BlockBuffers,
    out: np.ndarray,
    out_dtype: str,
    digests: _InputDigests,
) -> int:
    target = out[: count * ITEMSIZE[out_dtype]].view(fused.VIEW_DTYPES[out_dtype])
    alpha = np.float32(segment.alpha)
    if READ_MODE == "mmap":
        maps = _MappedInputs()
        try:
            roles = [
                (r, s) for r, s in enumerate((segment.plus, segment.minus, segment.addend)) if s is not None
            ]
            views = [
                _read_view(role, s, offset, count, files, buffers, digests)
                if fp8.is_scaled(s.info)
                else maps.view(files.fd(s.info.file), s, offset, count)
                for role, s in roles
            ]
            for k, (_, source) in enumerate(roles):  # no name left holding a view: maps.close() unmaps
                if not fp8.is_scaled(source.info):
                    digests.feed(source, source.start + offset, count, views[k])
            worst = _call_kernel(kernel, views, alpha, target)
            del views
        finally:
            maps.close()
        return worst
    views = [
        _read_view(role, s, offset, count, files, buffers, digests)
        for role, s in enumerate((segment.plus, segment.minus, segment.addend))
        if s is not None
    ]
    return _call_kernel(kernel, views, alpha, target)


def _call_kernel(kernel, views: list[np.ndarray], alpha: np.float32, target: np.ndarray) -> int:
    if kernel is fused.port_block:
        plus, minus, addend = views
        return int(kernel(plus, minus, alpha, addend, target))
    if kernel is fused.apply_block:
        plus, addend = views
        return int(kernel(plus, alpha, addend, target))
    return int(kernel(views[0], target))


def _sum_squares(values: np.ndarray) -> float:
    wide = values.astype(np.float64)
    return float(np.dot(wide, wide))


def _count_inexact(
    result: np.ndarray,
    minus: np.ndarray,
    original: Source,
    offset: int,
    files: _Files,
    buffers: kernels.BlockBuffers,
) -> int:
    """Elements where ``round(minus + result)`` differs from ``original``'s stored bits (``minus`` is reused)."""
    count = result.size
    info = original.info
    nbytes = count * info.itemsize
    back = np.add(minus, result, out=minus)
    encoded = np.empty(nbytes, np.uint8)
    kernels.encode(back, info.dtype, encoded, buffers)
    stored = np.empty(nbytes, np.uint8)
    kernels.pread_into(
        files.fd(info.file), memoryview(stored), info.offset + (original.start + offset) * info.itemsize
    )
    view = {2: np.uint16, 4: np.uint32}[info.itemsize]
    return int(np.count_nonzero(encoded.view(view) != stored.view(view)))


def total_bytes(shards: Iterable[ShardPlan]) -> int:
    return sum(shard.nbytes for shard in shards)
