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
    """Parse and validate one safetensors file's header; return its tensors and ``__metadata__``.

    The whole header is checked against the format's rules (those of the reference implementation,
    ``safetensors``' ``Metadata::validate``) before anything uses it: a UTF-8 JSON object starting with ``{``,
    no repeated keys; an optional ``__metadata__`` object of strings; for each tensor exactly ``dtype`` (a
    known one), ``shape`` (non-negative integers) and ``data_offsets`` (two integers, begin <= end), whose
    byte length is the shape's size in that dtype; and the tensors cover the data exactly, from 0 to the
    end of the file, with no overlap and no hole.
    """
    path = Path(path)
    fix = f"re-download or re-save {path.name}"

    def corrupt(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {problem}; {fix}")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise corrupt(f"file is too short to be safetensors ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise corrupt(
                f"header length {header_len} does not fit the file ({size} bytes); the file is truncated "
                "or not safetensors"
            )
        raw = handle.read(header_len)
    header = _parse_header_json(raw, corrupt)
    metadata = _header_metadata(header.pop("__metadata__", None), corrupt)
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _header_entry(name, entry, corrupt)
        if end > data_len:
            raise corrupt(
                f"tensor {name!r} points outside the file (offsets {begin}..{end}, data is {data_len} "
                "bytes): the file is truncated"
            )
        needed = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != needed:
            raise corrupt(
                f"tensor {name!r} has {end - begin} bytes (data_offsets {begin}..{end}) but shape "
                f"{list(shape)} of {dtype} needs {needed}"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin)
        spans.append((begin, end, name))
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise corrupt(f"tensors {previous!r} and {name!r} overlap")
        if begin > covered:
            raise corrupt(
                f"a hole of {begin - covered} bytes before tensor {name!r} (offset {begin}): the tensors do "
                "not cover the data contiguously"
            )
        covered, previous = end, name
    if covered != data_len:
        raise corrupt(
            f"the tensors cover {covered} bytes but the file has {data_len} bytes of data: "
            + ("trailing bytes no tensor names" if covered < data_len else "the file is truncated")
        )
    return tensors, metadata


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header_json(raw: bytes, corrupt) -> dict:
    def no_repeats(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise corrupt(f"header names {key!r} twice")
            seen[key] = value
        return seen

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise corrupt(f"header is not valid UTF-8 ({error})") from None
    if not text.startswith("{"):
        raise corrupt("header is not a JSON object (it must start with '{')")
    try:
        header = json.loads(text, object_pairs_hook=no_repeats, parse_constant=no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as error:
        if isinstance(error, CorruptCheckpointError):
            raise
        raise corrupt(f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    return header


def _header_metadata(metadata, corrupt) -> dict[str, str]:
    if metadata is None:  # absent, or null as the reference implementation allows
        return {}
    if not isinstance(metadata, dict):
        raise corrupt(f"__metadata__ is a JSON {type(metadata).__name__}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise corrupt(f"__metadata__ entry {key!r} is a {type(value).__name__}, not a string")
    return dict(metadata)


def _header_entry(name: str, entry, corrupt) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise corrupt(f"header entry for {name!r} is a JSON {type(entry).__name__}, not an object")
    fields = {"dtype", "shape", "data_offsets"}
    if set(entry) != fields:
        missing, extra = sorted(fields - set(entry)), sorted(set(entry) - fields)
        problems = [f"lacks {', '.join(missing)}"] * bool(missing) + [
            f"has unknown field(s) {', '.join(map(repr, extra))}"
        ] * bool(extra)
        raise corrupt(
            f"header entry for {name!r} {' and '.join(problems)} (needs exactly dtype, shape, data_offsets)"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise corrupt(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
        raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}; they are two integers [begin, end]")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}; they need 0 <= begin <= end")
    return dtype, tuple(shape), begin, end


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
