"""Safetensors reading and writing one tensor at a time (numpy only), with bfloat16 by bit shifts.

Writing: each tensor's bytes are appended to a data file as soon as they exist (whole, or chunk by chunk
between ``begin`` and ``end``); when a shard is full its header is written and the data copied after it,
so memory holds one tensor (a streamed one: one chunk), never a shard.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_residual.core.safetensors_io import (
    OutputTensor,
    TensorInfo,
    encode_header,
    shard_filenames,
    write_shard_index,
)

NUMPY_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "I32": np.int32,
    "I64": np.int64,
}


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_bf16(values: np.ndarray) -> np.ndarray:
    """The float32 values a bfloat16 store gives back."""
    return from_bf16_bits(to_bf16_bits(values))


def as_stored(dtype: str, values: np.ndarray) -> np.ndarray:
    """The array whose raw bytes are ``values`` stored as safetensors ``dtype``."""
    if dtype == "BF16":
        return to_bf16_bits(values)
    return np.ascontiguousarray(values, dtype=NUMPY_DTYPES[dtype])


def read_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor from disk; floating types come back as float32, integer types as they are."""
    if info.dtype == "BF16":
        raw = np.fromfile(info.file, dtype=np.uint16, count=info.numel, offset=info.offset)
        return from_bf16_bits(raw).reshape(info.shape)
    raw = np.fromfile(info.file, dtype=NUMPY_DTYPES[info.dtype], count=info.numel, offset=info.offset)
    if raw.dtype.kind == "f":
        raw = raw.astype(np.float32, copy=False)
    return raw.reshape(info.shape)


@dataclass
class ShardWriter:
    """Sharded safetensors output under ``folder`` named ``<prefix>[-0000i-of-0000N].safetensors``."""

    folder: Path
    prefix: str
    max_bytes: int
    shards: list[list[OutputTensor]] = field(default_factory=lambda: [[]])
    _size: int = 0
    _data: list[Path] = field(default_factory=list)
    _handle: object = None
    _pending: tuple[OutputTensor, int] | None = None

    def add(self, name: str, dtype: str, array: np.ndarray) -> None:
        """Append one tensor (``array`` holds its raw bytes in ``dtype``'s layout)."""
        self.begin(name, dtype, array.shape)
        self.write(array)
        self.end()

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start a tensor whose bytes follow in ``write`` calls (a streamed encoder's chunks)."""
        if self._pending is not None:
            raise RuntimeError(f"tensor {self._pending[0].name!r} not ended before {name!r}")
        tensor = OutputTensor(name, dtype, tuple(int(d) for d in shape))
        if self._handle is None or (self.shards[-1] and self._size + tensor.nbytes > self.max_bytes):
            self._open_shard()
        self.shards[-1].append(tensor)
        self._size += tensor.nbytes
        self._pending = (tensor, 0)

    def write(self, array: np.ndarray) -> None:
        """The next bytes of the tensor begun (``array``'s raw bytes, in order)."""
        tensor, written = self._pending
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._handle.write(data)
        self._pending = (tensor, written + data.nbytes)

    def end(self) -> None:
        """Close the tensor begun; its bytes must be exactly its shape's."""
        tensor, written = self._pending
        self._pending = None
        if written != tensor.nbytes:
            raise RuntimeError(
                f"tensor {tensor.name!r}: {written} bytes written, its shape takes {tensor.nbytes}"
            )

    def _open_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self.shards.append([])
        path = self.folder / f".{self.prefix}-data-{len(self._data)}"
        self._data.append(path)
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in _open_shard/close
        self._size = 0

    def close(self) -> list[str]:
        """Write the shards (and an index when there are several); return their file names."""
        if self._handle is None:
            self._open_shard()
        self._handle.close()
        names = shard_filenames(self.prefix, len(self.shards))
        for name, tensors, data in zip(names, self.shards, self._data, strict=True):
            with open(self.folder / name, "wb") as out, open(data, "rb") as source:
                out.write(encode_header(tensors))
                shutil.copyfileobj(source, out, 16 * 1024 * 1024)
            data.unlink()
        weight_map = {t.name: n for n, s in zip(names, self.shards, strict=True) for t in s}
        total_size = sum(t.nbytes for s in self.shards for t in s)
        write_shard_index(self.folder, self.prefix, weight_map, total_size)
        return names
