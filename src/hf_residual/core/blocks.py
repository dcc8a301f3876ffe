"""Per-block helpers of the engine: input views for the fused kernels (pread or mmap), the kernel call,
norms, the lossless round-trip count, and the message naming the input that holds NaN/Inf.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np

from hf_residual.core import fp8, fused, kernels
from hf_residual.core.jobs import Segment, Source, TensorJob, is_decoded
from hf_residual.core.safetensors_io import ITEMSIZE
from hf_residual.core.writer import Files, InputDigests


def non_finite_message(
    job: TensorJob, segment: Segment, start: int, stop: int, files: Files, buffers: kernels.BlockBuffers
) -> str:
    """Say which input holds NaN/Inf, or that the result overflowed the output dtype."""
    for role, source in (("plus", segment.plus), ("minus", segment.minus), ("addend", segment.addend)):
        if source is None or is_decoded(source.info):  # encoded: its reader refuses NaN/Inf in its parts
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


class MappedInputs:
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


def read_view(
    role: int,
    source: Source,
    offset: int,
    count: int,
    files: Files,
    buffers: kernels.BlockBuffers,
    digests: InputDigests,
    decode: Callable[[Source, int, int, np.ndarray], None] | None = None,
) -> np.ndarray:
    info = source.info
    if is_decoded(info):  # an encoded residual: its codec's reader decodes into float32, fused after
        values = buffers.raws[role][: count * 4].view(np.float32)
        decode(source, offset, count, values)
        return values
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


def run_fused(
    kernel,
    segment: Segment,
    offset: int,
    count: int,
    files: Files,
    buffers: kernels.BlockBuffers,
    out: np.ndarray,
    out_dtype: str,
    digests: InputDigests,
    read_mode: str = "pread",
    decode: Callable[[Source, int, int, np.ndarray], None] | None = None,
) -> int:
    """One block through a fused kernel; ``decode`` reads encoded inputs (``DecodedInfo``) as float32."""
    target = out[: count * ITEMSIZE[out_dtype]].view(fused.VIEW_DTYPES[out_dtype])
    alpha = np.float32(segment.alpha)
    if read_mode == "mmap":
        maps = MappedInputs()
        try:
            roles = [
                (r, s) for r, s in enumerate((segment.plus, segment.minus, segment.addend)) if s is not None
            ]
            views = [
                read_view(role, s, offset, count, files, buffers, digests, decode)
                if _copied(s)
                else maps.view(files.fd(s.info.file), s, offset, count)
                for role, s in roles
            ]
            for k, (_, source) in enumerate(roles):  # no name left holding a view: maps.close() unmaps
                if not _copied(source):
                    digests.feed(source, source.start + offset, count, views[k])
            worst = call_kernel(kernel, views, alpha, target)
            del views
        finally:
            maps.close()
        return worst
    views = [
        read_view(role, s, offset, count, files, buffers, digests, decode)
        for role, s in enumerate((segment.plus, segment.minus, segment.addend))
        if s is not None
    ]
    return call_kernel(kernel, views, alpha, target)


def _copied(source: Source) -> bool:
    """Inputs the mmap mode cannot map as they are stored: FP8 (dequantized) and encoded ones (decoded)."""
    return fp8.is_scaled(source.info) or is_decoded(source.info)


def call_kernel(kernel, views: list[np.ndarray], alpha: np.float32, target: np.ndarray) -> int:
    if kernel is fused.port_block:
        plus, minus, addend = views
        return int(kernel(plus, minus, alpha, addend, target))
    if kernel is fused.apply_block:
        plus, addend = views
        return int(kernel(plus, alpha, addend, target))
    return int(kernel(views[0], target))


def sum_squares(values: np.ndarray) -> float:
    wide = values.astype(np.float64)
    return float(np.dot(wide, wide))


def count_inexact(
    result: np.ndarray,
    minus: np.ndarray,
    original: Source,
    offset: int,
    files: Files,
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
