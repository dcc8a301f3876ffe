"""The codec interface: parse a spec string, encode a float32 residual tensor, decode it back.

A spec reads ``NAME[:ARG][,KEY=VALUE...]``, e.g. ``lowrank:64``, ``lowrank:energy=0.9``, ``bitdelta``,
``sparse:0.1,seed=3``, ``sparse:topk=0.1``. Every codec compresses 2-D weight matrices; other tensors
(norms, biases, 1-D) and, unless ``embeddings=compress``, embeddings and the LM head are kept dense in
bfloat16, as is the part of a tensor that holds new vocabulary rows (absolute instruct values).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from hf_residual.errors import ConfigError

EMBEDDING_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "embeddings")


@dataclass
class Encoded:
    """One tensor's encoding: named parts (stored as ``<tensor>.<part>``) and the params to record."""

    parts: dict[str, tuple[str, np.ndarray]]  # part -> (safetensors dtype, array)
    params: dict = field(default_factory=dict)


def parse_options(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"sparse:0.1,seed=3"`` -> ``("sparse", "0.1", {"seed": "3"})``."""
    text = spec.strip()
    cut = min((i for i in (text.find(":"), text.find(",")) if i >= 0), default=len(text))
    name, rest = text[:cut], text[cut + 1 :]
    positional: str | None = None
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if eq:
            options[key.strip().lower()] = value.strip()
        elif positional is None:
            positional = item
        else:
            raise ConfigError(f"codec {spec!r}: more than one positional parameter; write e.g. lowrank:64")
    return name.strip().lower(), positional, options


def to_float(spec: str, key: str, text: str, low: float, high: float) -> float:
    """A number in ``(low, high]`` or a ConfigError that says what was expected."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"codec {spec!r}: {key} must be a number, got {text!r}") from None
    if not low < value <= high:
        raise ConfigError(f"codec {spec!r}: {key} must be in ({low}, {high}], got {value}")
    return value


STORAGE_DTYPES = {"bfloat16": "BF16", "bf16": "BF16", "float32": "F32", "fp32": "F32"}


def storage_dtype(spec: str, options: dict[str, str]) -> str:
    """The ``dtype=`` option (bfloat16 by default) as a safetensors dtype; removed from ``options``."""
    name = options.pop("dtype", "bfloat16").lower()
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"codec {spec!r}: dtype must be bfloat16 or float32, got {name!r}")
    return STORAGE_DTYPES[name]


def to_int(spec: str, key: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"codec {spec!r}: {key} must be a whole number, got {text!r}") from None
    if value < low:
        raise ConfigError(f"codec {spec!r}: {key} must be at least {low}, got {value}")
    return value


class Codec(ABC):
    """One lossy codec with its parameters; ``encode``/``decode`` work on one float32 matrix at a time."""

    name: str = ""
    spec: str = ""

    def __init__(self, spec: str, options: dict[str, str]):
        self.spec = spec
        embeddings = options.pop("embeddings", "dense")
        if embeddings not in ("dense", "compress"):
            raise ConfigError(f"codec {spec!r}: embeddings must be dense or compress, got {embeddings!r}")
        self.compress_embeddings = embeddings == "compress"
        if options:
            raise ConfigError(
                f"codec {spec!r}: unknown parameter(s) {', '.join(sorted(options))}; see docs/CODECS.md"
            )

    @classmethod
    @abstractmethod
    def parse(cls, spec: str, positional: str | None, options: dict[str, str]) -> Codec:
        """Build the codec from its parsed spec; bad parameters raise ConfigError."""

    def compresses(self, name: str, shape: tuple[int, ...], absolute_rows_from: int | None) -> bool:
        """Whether this tensor is encoded (else it is kept dense in bfloat16)."""
        if len(shape) != 2 or absolute_rows_from is not None or min(shape) == 0:
            return False
        return self.compress_embeddings or not any(m in name for m in EMBEDDING_MARKERS)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ConfigError if this codec cannot encode a matrix of ``shape`` (before any work)."""
        return None

    @abstractmethod
    def encode(self, name: str, matrix: np.ndarray) -> Encoded | None:
        """Encode one float32 matrix; None when the encoding would not be smaller than dense bfloat16
        (the matrix is then stored dense, which is also exact to bfloat16)."""

    @abstractmethod
    def decode(self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict) -> np.ndarray:
        """Give back a float32 array of ``shape`` from the stored parts and recorded params."""

    def legacy_decode(
        self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict, decoded: np.ndarray
    ) -> np.ndarray:
        """The values versions before part digests hashed as a tensor's ``sha256`` (the same as
        ``decoded`` unless the decoding changed): recorded so those versions still read new residuals."""
        return decoded

    def describe(self) -> dict:
        """What the manifest records about the codec as a whole."""
        return {
            "name": self.name,
            "spec": self.spec,
            "embeddings": "compress" if self.compress_embeddings else "dense",
        }

    def dense_text(self) -> str:
        """Which tensors stay dense, for notes."""
        kept = "norms and 1-D tensors" if self.compress_embeddings else "embeddings, norms and 1-D tensors"
        return f"{kept} dense in bfloat16"

    def note(self) -> str:
        """One sentence for the manifest note and the card."""
        return f"lossy codec {self.spec}"
