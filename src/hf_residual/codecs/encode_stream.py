"""Streamed encoding: tensors kept dense, bitdelta and DARE matrices, chunk by chunk from the exact residual.

``extract --codec`` computes each tensor of the exact residual ``R`` (``exact.ExactTensor``) in chunks of
``fidelity.CHUNK`` elements counted from the tensor's start, as often as its encoder needs, and never
holds it whole in float32. The chunks are those the whole-tensor path (``folders``) sums its errors over,
so every stored byte, digest and figure equals that path's bit for bit (``tests/test_codecs_encode_stream.py``):

- kept dense (embeddings and LM head by default, norms, 1-D, new vocabulary rows): one pass; each chunk
  is rounded to bfloat16, written, hashed (``stored_sha256``; ``sha256`` of the decoded float32) and
  its error summed.
- bitdelta: pass 1 writes the packed signs and sums ``|R|`` in float64 as numpy's ``mean`` does (pieces
  of ``_SUM_BUFFER`` elements summed pairwise, the pieces in order; per row: whole rows); pass 2 decodes
  with the scale, hashes and sums the error.
- sparse DARE: the mask is the seeded generator's stream, drawn again chunk by chunk: pass 1 counts the
  kept elements and the largest gap (the gaps' dtype), pass 2 writes the gaps, pass 3 (the only one that
  reads R) the kept values, the hash and the error.

Lowrank (an SVD needs the whole matrix) and ``sparse:topk`` (a global top-k whose ties ``argpartition``
breaks in no order a stream can reproduce) are encoded whole, one matrix in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from hf_residual.codecs import fidelity
from hf_residual.codecs.base import Codec
from hf_residual.codecs.bitdelta import BitDelta
from hf_residual.codecs.parts import sha256_of
from hf_residual.codecs.sparse import Sparse, gaps_dtype, tensor_seed
from hf_residual.codecs.store import NUMPY_DTYPES, ShardWriter, as_stored, from_bf16_bits, to_bf16_bits

_SUM_BUFFER = (
    8192  # numpy's reduction buffer (np.getbufsize()): a float32 -> float64 sum adds its pieces in order
)


class Source(Protocol):
    """One tensor of the exact residual: whole or in chunks, as often as asked (``exact.ExactTensor``)."""

    name: str
    shape: tuple[int, ...]
    base_norm: float | None
    residual_norm: float | None

    def values(self) -> np.ndarray: ...

    def chunks(self, size: int) -> Iterator[np.ndarray]: ...


class ArrayTensor:
    """A tensor already in memory (a float32 residual folder's), as a ``Source``; its norms are the manifest's."""

    base_norm = residual_norm = None

    def __init__(self, name: str, values: np.ndarray):
        self.name, self._values, self.shape = name, values, tuple(values.shape)

    def values(self) -> np.ndarray:
        return self._values

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        flat = self._values.reshape(-1)
        for at in range(0, flat.size, size):
            yield flat[at : at + size]


def streams(codec: Codec | None) -> bool:
    """Whether a tensor is encoded in chunks: ``codec`` None means kept dense in bfloat16."""
    return (
        codec is None or isinstance(codec, BitDelta) or (isinstance(codec, Sparse) and codec.method == "dare")
    )


def encode(
    source: Source, codec: Codec | None, writer: ShardWriter, errors: fidelity.ErrorSummary
) -> tuple[dict, str]:
    """Write one tensor's parts (``codec`` None: dense bfloat16); return its manifest ``codec`` entry and
    the sha256 of its decoded float32 values."""
    chunk = fidelity.CHUNK
    if chunk % _SUM_BUFFER:
        raise ValueError(f"chunks of {chunk} elements: a multiple of {_SUM_BUFFER} is needed")
    if codec is None:
        return _dense(source, writer, errors, chunk)
    if isinstance(codec, BitDelta):
        return _bitdelta(source, codec, writer, errors, chunk)
    return _dare(source, codec, writer, errors, chunk)


def _dense(
    source: Source, writer: ShardWriter, errors: fidelity.ErrorSummary, chunk: int
) -> tuple[dict, str]:
    stored, legacy, tensor = hashlib.sha256(), hashlib.sha256(), fidelity.TensorError()
    writer.begin(source.name, "BF16", source.shape)
    for values in source.chunks(chunk):
        bits = to_bf16_bits(values)
        writer.write(bits)
        stored.update(bits)
        approx = from_bf16_bits(bits)
        legacy.update(approx)
        tensor.add(values, approx)
    writer.end()
    errors.record(source.name, tensor)
    return {
        "kind": "dense",
        "parts": [],
        "dtype": "BF16",
        "stored_sha256": stored.hexdigest(),
    }, legacy.hexdigest()


class _AbsSum:
    """``sum |R|`` in float64 exactly as ``np.mean(np.abs(R), dtype=np.float64)`` sums it."""

    def __init__(self):
        self.total = 0.0

    def add(self, values: np.ndarray) -> None:
        wide = np.abs(values).astype(np.float64)
        full = wide.size // _SUM_BUFFER * _SUM_BUFFER
        pieces = [np.array([self.total]), wide[:full].reshape(-1, _SUM_BUFFER).sum(axis=1)]
        if full < wide.size:
            pieces.append(np.array([wide[full:].sum()]))
        self.total = float(np.cumsum(np.concatenate(pieces))[-1])  # in order, as numpy adds its buffers


class _RowMeans:
    """``np.mean(np.abs(R), axis=1, dtype=np.float64)`` over whole rows, a row that spans chunks held once."""

    def __init__(self, rows: int, cols: int):
        self.cols, self.means, self.done = cols, np.empty(rows, np.float64), 0
        self.partial, self.fill = np.empty(cols, np.float32), 0

    def _rows(self, values: np.ndarray) -> None:
        count = values.size // self.cols
        block = np.abs(values.reshape(count, self.cols))
        self.means[self.done : self.done + count] = np.mean(block, axis=1, dtype=np.float64)
        self.done += count

    def add(self, values: np.ndarray) -> None:
        at = 0
        if self.fill:
            at = min(self.cols - self.fill, values.size)
            self.partial[self.fill : self.fill + at] = values[:at]
            self.fill += at
            if self.fill < self.cols:
                return
            self._rows(self.partial)
            self.fill = 0
        whole = (values.size - at) // self.cols * self.cols
        self._rows(values[at : at + whole])
        rest = values[at + whole :]
        self.partial[: rest.size] = rest
        self.fill = rest.size


def _bitdelta(
    source: Source, codec: BitDelta, writer: ShardWriter, errors: fidelity.ErrorSummary, chunk: int
) -> tuple[dict, str]:
    rows, cols = source.shape
    signs = hashlib.sha256()
    writer.begin(f"{source.name}.signs", "U8", ((rows * cols + 7) // 8,))
    sums = _RowMeans(rows, cols) if codec.per_row else _AbsSum()
    for values in source.chunks(chunk):  # pass 1: signs and sum |R|
        packed = np.packbits(values >= 0)  # chunks are whole bytes of signs (chunk % 8 == 0)
        writer.write(packed)
        signs.update(packed)
        sums.add(values)
    writer.end()
    if codec.per_row:
        scales = sums.means.astype(np.float32)
        params = {"scale": "row", "mean_scale": float(scales.mean())}
    else:
        scales = np.array([sums.total / (rows * cols)], np.float32)
        params = {"scale": float(scales[0])}
    writer.add(f"{source.name}.scale", "F32", scales)
    legacy, tensor, at = hashlib.sha256(), fidelity.TensorError(), 0
    for values in source.chunks(chunk):  # pass 2: the decoded values, their digest and error
        scale = scales[np.arange(at, at + values.size) // cols] if codec.per_row else scales[0]
        approx = np.where(values >= 0, scale, -scale).astype(np.float32)
        legacy.update(approx)
        tensor.add(values, approx)
        at += values.size
    errors.record(source.name, tensor)
    digests = {"scale": sha256_of(scales), "signs": signs.hexdigest()}
    info = {"kind": codec.name, "parts": ["scale", "signs"], **params, "part_sha256": digests}
    return info, legacy.hexdigest()


def _masks(seed: int, density: float, numel: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, kept indices within the chunk)`` of DARE's mask, drawn chunk by chunk (the same stream
    as one ``random(numel)``: every draw takes one 64-bit output of the generator)."""
    rng = np.random.default_rng(seed)
    for at in range(0, numel, chunk):
        yield at, np.flatnonzero(rng.random(min(chunk, numel - at)) < density)


def _dare(
    source: Source, codec: Sparse, writer: ShardWriter, errors: fidelity.ErrorSummary, chunk: int
) -> tuple[dict, str]:
    numel, seed = int(np.prod(source.shape)), tensor_seed(codec.seed, source.name)
    kept, last, largest = 0, -1, 0
    for at, index in _masks(seed, codec.density, numel, chunk):  # pass 1: count and largest gap
        if index.size:
            largest = max(largest, int(np.diff(index + at, prepend=last).max()))
            kept, last = kept + index.size, at + int(index[-1])
    gap_dtype, gaps_digest, last = gaps_dtype(largest), hashlib.sha256(), -1
    writer.begin(f"{source.name}.gaps", gap_dtype, (kept,))
    for at, index in _masks(seed, codec.density, numel, chunk):  # pass 2: the gaps
        gaps = np.diff(index + at, prepend=last).astype(NUMPY_DTYPES[gap_dtype])
        writer.write(gaps)
        gaps_digest.update(gaps)
        last = at + int(index[-1]) if index.size else last
    writer.end()
    values_digest, legacy, tensor = hashlib.sha256(), hashlib.sha256(), fidelity.TensorError()
    writer.begin(f"{source.name}.values", codec.dtype, (kept,))
    masks = _masks(seed, codec.density, numel, chunk)
    for values in source.chunks(chunk):  # pass 3: the kept values, the decoded digest and the error
        _, index = next(masks)
        stored = as_stored(codec.dtype, (values[index] / np.float32(codec.density)).astype(np.float32))
        writer.write(stored)
        values_digest.update(stored)
        approx = np.zeros(values.size, np.float32)
        approx[index] = from_bf16_bits(stored) if codec.dtype == "BF16" else stored
        legacy.update(approx)
        tensor.add(values, approx)
    writer.end()
    errors.record(source.name, tensor)
    params = {
        "method": "dare",
        "seed": seed,
        "kept": kept,
        "density": codec.density,
        "value_dtype": codec.dtype,
    }
    digests = {"gaps": gaps_digest.hexdigest(), "values": values_digest.hexdigest()}
    return {
        "kind": codec.name,
        "parts": ["gaps", "values"],
        **params,
        "part_sha256": digests,
    }, legacy.hexdigest()
