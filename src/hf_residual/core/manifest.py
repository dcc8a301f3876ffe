"""The residual manifest (``residual.json``): what a residual folder holds and where it came from.

Format version 1. Readers refuse versions and codecs they do not know, naming the version needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_residual._version import __version__
from hf_residual.core.safetensors_io import TensorInfo
from hf_residual.errors import ManifestError, VerificationError

MANIFEST_NAME = "residual.json"
_SHA256 = re.compile("[0-9a-f]{64}")
FORMAT_NAME = "hf-residual"
FORMAT_VERSION = 1
WEIGHTS_PREFIX = "residual"
# Names of the lossy codecs a manifest may record (the codecs themselves live in ``hf_residual.codecs``;
# ``codecs.registry.CODECS`` has exactly these keys, which tests/test_layers.py checks). A new codec is
# named here too: the name is part of the file format, which this layer reads and validates.
LOSSY_CODECS = ("lowrank", "bitdelta", "sparse")
CODECS = {
    "float32": "F32",
    "bfloat16": "BF16",
}
CODEC_NOTES = {
    "float32": (
        "float32 residual: for bfloat16 and float16 models, base + residual gives back the instruct weights "
        "bit for bit, checked for every element while extracting (see lossless and inexact_elements)"
    ),
    "bfloat16": (
        "lossy: each residual value is rounded to bfloat16 (8 significant bits, relative error up to 2^-9 "
        "per value); base + residual is within one bfloat16 rounding of the instruct weights, not bit-exact. "
        "Half the size of float32; use --dtype float32 for an exact residual"
    ),
}


@dataclass
class ModelIdentity:
    """Where a model came from: a local folder name, or a Hub repo id with its pinned commit sha."""

    name: str
    repo_id: str | None = None
    revision: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None


@dataclass
class TensorEntry:
    shape: list[int]
    dtype: str
    sha256: str
    source_dtype: str
    absolute_rows_from: int | None = None
    base_norm: float = 0.0
    residual_norm: float = 0.0
    base_sample: list[float] = field(default_factory=list)
    # Lossy codecs (hf_residual.codecs): how this tensor was encoded (kind, rank, scale, seed, ...).
    codec: dict | None = None


@dataclass
class Manifest:
    codec: str
    base: ModelIdentity
    instruct: ModelIdentity
    model_type: str | None
    architectures: list[str]
    base_vocab_size: int | None
    instruct_vocab_size: int | None
    tensors: dict[str, TensorEntry]
    # The base tokenizer's token count: a target's tokens from this id on are its own (``vocab``).
    base_tokens: int | None = None
    note: str = ""
    # Elements for which base + residual does not round back to the instruct value (float32 codec only).
    inexact_elements: int = 0
    # Lossy codecs: the codec's spec and parameters, and the measured fidelity (sizes, errors, KL).
    codec_params: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__

    @property
    def lossless(self) -> bool:
        """True when ``base + residual`` was verified to give back every instruct weight bit for bit."""
        return (
            self.codec == "float32"
            and self.inexact_elements == 0
            and all(entry.source_dtype in ("BF16", "F16") for entry in self.tensors.values())
        )

    def write(self, folder: Path) -> None:
        data = asdict(self)
        data["lossless"] = self.lossless
        (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=1) + "\n")

    @property
    def absolute_rows_from(self) -> dict[str, int | None]:
        return {name: entry.absolute_rows_from for name, entry in self.tensors.items()}

    @property
    def checksums(self) -> dict[str, str]:
        return {name: entry.sha256 for name, entry in self.tensors.items()}

    def check_weights(self, tensors: dict[str, TensorInfo], folder: Path) -> None:
        """The shards' headers must hold what the manifest records: per tensor its shape, dtype, and a
        sha256 to check the data against (``engine`` checks the digests as it reads the bytes).

        Run before any arithmetic; names are compared by the caller.
        """
        fix = "re-download the residual, or re-extract it from the instruct and base models"
        for name in sorted(tensors.keys() & self.tensors.keys()):
            info, entry = tensors[name], self.tensors[name]
            if tuple(entry.shape) != info.shape or entry.dtype != info.dtype:
                raise VerificationError(
                    f"{folder}: tensor {name!r} is stored as {info.dtype} {list(info.shape)} but the manifest "
                    f"records {entry.dtype} {list(entry.shape)}: the residual is damaged (weights and "
                    f"{MANIFEST_NAME} do not belong together); {fix}"
                )
            if not _SHA256.fullmatch(entry.sha256 or ""):
                raise VerificationError(
                    f"{folder}: the manifest records no valid sha256 for tensor {name!r}, so its data cannot "
                    f"be checked: the residual is damaged; {fix}"
                )


def is_residual_folder(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{folder}: no {MANIFEST_NAME}; this is not a residual folder made by hf-residual extract"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{path}: not valid JSON ({error}); re-create the residual with hf-residual extract"
        ) from None
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not an hf-residual manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest format version {version} is newer than this hf-residual ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade: pip install -U hf-residual (the residual was written by "
            f"hf-residual {data.get('tool_version', '?')})"
        )
    codec = data.get("codec")
    if codec not in CODECS and codec not in LOSSY_CODECS:
        known = ", ".join([*CODECS, *LOSSY_CODECS])
        raise ManifestError(
            f"{path}: codec {codec!r} is unknown to hf-residual {__version__} (knows {known}); "
            f"it was written by hf-residual {data.get('tool_version', '?')}: upgrade to at least that version"
        )
    try:
        tensors = {name: TensorEntry(**entry) for name, entry in data["tensors"].items()}
        return Manifest(
            codec=codec,
            base=ModelIdentity(**data["base"]),
            instruct=ModelIdentity(**data["instruct"]),
            model_type=data.get("model_type"),
            architectures=list(data.get("architectures") or []),
            base_vocab_size=data.get("base_vocab_size"),
            instruct_vocab_size=data.get("instruct_vocab_size"),
            tensors=tensors,
            base_tokens=data.get("base_tokens"),
            note=data.get("note", ""),
            inexact_elements=int(data.get("inexact_elements", 0)),
            codec_params=dict(data.get("codec_params") or {}),
            fidelity=dict(data.get("fidelity") or {}),
            format_version=version,
            tool_version=data.get("tool_version", "?"),
        )
    except (KeyError, TypeError) as error:
        raise ManifestError(f"{path}: malformed manifest ({error}); re-create the residual") from None
