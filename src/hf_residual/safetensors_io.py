"""Reading and writing the safetensors format directly, so tensors can be streamed in blocks.

The format: 8 bytes little-endian header length N, N bytes of JSON (name -> dtype, shape, data_offsets
relative to the end of the header, plus optional ``__metadata__``), then the raw little-endian bytes.
Headers are validated strictly because a corrupt header must fail before any arithmetic starts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from hf_residual.errors import CorruptCheckpointError

ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``offset`` is absolute within ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its tensors and ``__metadata__``."""
    path = Path(path)
    fix = f"re-download or re-save {path.name}"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CorruptCheckpointError(f"{path}: file is too short to be safetensors ({size} bytes); {fix}")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpointError(
                f"{path}: header length {header_len} does not fit the file ({size} bytes); the file is "
                f"truncated or not safetensors; {fix}"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({error}); {fix}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object; {fix}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: malformed header entry for {name!r}; {fix}") from None
        if dtype not in ITEMSIZE:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; {fix}")
        if any(d < 0 for d in shape) or begin < 0 or end < begin or end > data_len:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} points outside the file (offsets {begin}..{end}, data is "
                f"{data_len} bytes): the file is truncated; {fix}"
            )
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} of {dtype} needs "
                f"{math.prod(shape) * ITEMSIZE[dtype]}; {fix}"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CorruptCheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap; {fix}")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to be written: its bytes are produced later, in blocks."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors written in the given order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def shard_filenames(prefix: str, total: int) -> list[str]:
    """``<prefix>.safetensors`` for one shard, else transformers' ``<prefix>-0000i-of-0000N.safetensors``."""
    if total == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]


def write_shard_index(
    folder: Path, prefix: str, weight_map: dict[str, str], total_size: int, metadata: dict | None = None
) -> None:
    """Write ``<prefix>.safetensors.index.json`` (only when the tensors span more than one shard)."""
    if len(set(weight_map.values())) < 2:
        return
    index = {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
