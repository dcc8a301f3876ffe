"""Block kernels: decode stored floats to float32, encode float32 back with one rounding.

Why by hand: numpy has no bfloat16, and whole-tensor math is memory bound on this CPU. Working on
cache-sized blocks with preallocated buffers keeps every pass in cache. bfloat16 is the top half of a
float32, so decoding is a 16-bit shift and encoding is round-to-nearest-even by integer arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from hf_residual.core import fp8, fused
from hf_residual.core.safetensors_io import ITEMSIZE, TensorInfo

# Largest float32 bit pattern (sign cleared) that still rounds to a finite value in each dtype.
_FINITE_LIMIT = {
    "F32": 0x7F7FFFFF,
    "BF16": 0x7F7F7FFF,  # 0x7F7F8000 and above round up to bfloat16 infinity
    "F16": 0x477FEFFF,  # 65520.0 (0x477FF000) and above round to float16 infinity
}


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short read means the file changed under us."""
    done = 0
    total = len(buffer)
    while done < total:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}: was the file truncated?")
        done += got


class BlockBuffers:
    """Preallocated buffers for blocks of up to ``block`` elements."""

    def __init__(self, block: int):
        self.block = block
        self.acc = np.empty(block, np.float32)
        self.tmp = np.empty(block, np.float32)
        self.raw = np.empty(block * 8, np.uint8)
        self.bits = np.empty(block, np.uint32)
        # One raw buffer per input role (plus, minus, addend) for the fused kernels.
        self.raws = [np.empty(block * 4, np.uint8) for _ in range(3)]
        # FP8 scale tensors read so far (a few: a port reads three weights block by block in turn).
        self.scales: dict[TensorInfo, fp8.ScaleTable] = {}

    def scale_table(self, info: fp8.ScaledInfo) -> fp8.ScaleTable:
        table = self.scales.get(info.scale)
        if table is None:
            if len(self.scales) >= 4:
                del self.scales[next(iter(self.scales))]
            table = self.scales[info.scale] = fp8.ScaleTable(info, pread_into)
        return table


def decode(
    fd: int,
    info: TensorInfo,
    start: int,
    count: int,
    out: np.ndarray,
    buffers: BlockBuffers,
    raw_sink: Callable[[memoryview], None] | None = None,
) -> None:
    """Read elements ``start:start+count`` of ``info`` from ``fd`` into ``out[:count]`` as float32.

    ``raw_sink``, if given, sees the stored bytes as read, before they are decoded (to hash them).
    """
    itemsize = ITEMSIZE[info.dtype]
    offset = info.offset + start * itemsize
    target = out[:count]
    if info.dtype == "F32":
        pread_into(fd, memoryview(target).cast("B"), offset)
        if raw_sink is not None:
            raw_sink(memoryview(target).cast("B"))
        return
    raw = buffers.raw[: count * itemsize]
    pread_into(fd, memoryview(raw), offset)
    if raw_sink is not None:
        raw_sink(memoryview(raw))
    if info.dtype == "BF16":
        np.left_shift(raw.view(np.uint16), 16, out=target.view(np.uint32), dtype=np.uint32)
    elif info.dtype == "F16":
        np.copyto(target, raw.view(np.float16))
    elif info.dtype == "F64":
        np.copyto(target, raw.view(np.float64), casting="same_kind")
    elif fp8.is_scaled(info):  # FP8 with block scales: code values times the scale of their block
        table = buffers.scale_table(info)
        if fused.AVAILABLE:  # one pass; the same products as the numpy passes below
            fused.dequant_block(
                raw, fp8.DECODE[info.dtype], table.rows, start, table.cols, table.block_rows, target
            )
        else:
            np.take(fp8.DECODE[info.dtype], raw, out=target)
            table.apply(start, target)
    else:  # pragma: no cover - callers only plan float tensors
        raise TypeError(f"cannot decode {info.dtype}")


def max_magnitude_bits(values: np.ndarray, buffers: BlockBuffers) -> int:
    """Largest ``|x|`` as a float32 bit pattern: one pass that finds NaN, Inf and overflow alike."""
    bits = buffers.bits[: values.size]
    np.bitwise_and(values.view(np.uint32), 0x7FFFFFFF, out=bits)
    return int(bits.max()) if bits.size else 0


def overflows(max_bits: int, dtype: str) -> bool:
    return max_bits > _FINITE_LIMIT[dtype]


def encode(values: np.ndarray, dtype: str, out: np.ndarray, buffers: BlockBuffers) -> memoryview:
    """Round float32 ``values`` once (nearest even) into ``out`` (raw bytes); return the filled bytes.

    ``values`` is used as scratch space and must be finite (check with ``max_magnitude_bits`` first).
    """
    count = values.size
    if dtype == "F32":
        target = out[: count * 4].view(np.float32)
        np.copyto(target, values)
    elif dtype == "BF16":
        bits = values.view(np.uint32)
        lsb = buffers.bits[:count]
        np.right_shift(bits, 16, out=lsb)
        np.bitwise_and(lsb, 1, out=lsb)
        lsb += 0x7FFF
        bits += lsb
        bits >>= 16
        target = out[: count * 2].view(np.uint16)
        np.copyto(target, bits, casting="unsafe")
    elif dtype == "F16":
        target = out[: count * 2].view(np.float16)
        np.copyto(target, values, casting="same_kind")
    else:  # pragma: no cover
        raise TypeError(f"cannot encode {dtype}")
    return memoryview(out[: count * ITEMSIZE[dtype]])
