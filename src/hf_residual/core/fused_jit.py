"""The numba kernels behind ``fused`` (see there): imported only when the engine first needs one.

Compiled with ``cache=True``: the machine code is stored beside this file (``__pycache__``) on first use
and loaded from there afterwards.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def _u32_as_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _half_bits_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_half_bits(typingctx, x):
    # LLVM's fptrunc rounds to nearest even, as numpy's float32 -> float16 cast does.
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


def _load(x):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_load)
def _load_impl(x):
    if x == types.uint16:
        return lambda x: _u32_as_f32(np.uint32(x) << np.uint32(16))
    if x == types.int16:
        return lambda x: _half_bits_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


def _store(out, k, value):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_store)
def _store_impl(out, k, value):
    if out.dtype == types.uint16:

        def store_bf16(out, k, value):
            bits = _f32_as_u32(value)
            bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            out[k] = np.uint16(bits >> np.uint32(16))

        return store_bf16
    if out.dtype == types.int16:

        def store_f16(out, k, value):
            out[k] = _f32_to_half_bits(value)

        return store_f16
    if out.dtype == types.float32:

        def store_f32(out, k, value):
            out[k] = value

        return store_f32
    return None


@njit(nogil=True, cache=True, boundscheck=False)
def port_block(plus, minus, alpha, addend, out):
    """out = addend + alpha * (plus - minus); returns max |result| bits."""
    worst = np.uint32(0)
    for k in range(out.size):
        value = (_load(plus[k]) - _load(minus[k])) * alpha + _load(addend[k])
        worst = max(worst, _f32_as_u32(value) & np.uint32(0x7FFFFFFF))
        _store(out, k, value)
    return worst


@njit(nogil=True, cache=True, boundscheck=False)
def apply_block(plus, alpha, addend, out):
    """out = addend + alpha * plus; returns max |result| bits."""
    worst = np.uint32(0)
    for k in range(out.size):
        value = _load(plus[k]) * alpha + _load(addend[k])
        worst = max(worst, _f32_as_u32(value) & np.uint32(0x7FFFFFFF))
        _store(out, k, value)
    return worst


@njit(nogil=True, cache=True, boundscheck=False)
def copy_block(plus, out):
    """out = plus converted (one rounding); returns max |result| bits."""
    worst = np.uint32(0)
    for k in range(out.size):
        value = _load(plus[k])
        worst = max(worst, _f32_as_u32(value) & np.uint32(0x7FFFFFFF))
        _store(out, k, value)
    return worst


@njit(nogil=True, cache=True, boundscheck=False)
def dequant_block(codes, table, rows, start, cols, block_rows, out):
    """FP8 with block scales: ``out[k] = table[codes[k]] * rows[r // block_rows, c]`` for element
    ``start + k`` = ``(r, c)`` of a ``cols``-column matrix (``rows``: scales expanded along columns)."""
    count = out.size
    row = start // cols
    col = start - row * cols
    k = 0
    while k < count:
        scales = rows[row // block_rows]
        n = min(cols - col, count - k)
        for j in range(n):
            out[k + j] = table[codes[k + j]] * scales[col + j]
        k += n
        row += 1
        col = 0


@njit(nogil=True, cache=True, boundscheck=False)
def signs_block(packed, first_bit, scales, start, cols, out):
    """bitdelta: ``out[k] = scale`` if sign bit ``first_bit + k`` of ``packed`` is 1 (most significant bit
    first, as ``np.unpackbits``), else ``-scale``; element ``start + k`` of a ``cols``-column matrix takes
    ``scales[row]`` (one scale for the whole tensor: ``scales`` of length 1 and ``cols`` its size)."""
    count = out.size
    row = start // cols
    col = start - row * cols
    k = 0
    while k < count:
        scale = scales[row]
        n = min(cols - col, count - k)
        for j in range(n):
            bit = first_bit + k + j
            positive = (packed[bit >> 3] >> (7 - (bit & 7))) & 1
            out[k + j] = scale if positive else -scale
        k += n
        row += 1
        col = 0
