"""Codec names -> classes, and the parsing of ``--codec`` values (lossless names included)."""

from __future__ import annotations

from hf_residual._version import __version__
from hf_residual.codecs.base import Codec, parse_options
from hf_residual.codecs.bitdelta import BitDelta
from hf_residual.codecs.lowrank import LowRank
from hf_residual.codecs.sparse import Sparse
from hf_residual.errors import ConfigError, ManifestError

CODECS: dict[str, type[Codec]] = {"lowrank": LowRank, "bitdelta": BitDelta, "sparse": Sparse}
# --codec values that are the engine's own storage dtypes (no encoding layer).
DENSE = {
    "lossless": "float32",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
EXAMPLES = (
    "float32 (lossless), bfloat16, lowrank:64, lowrank:energy=0.9, bitdelta, sparse:0.1, sparse:topk=0.1"
)


def dense_dtype(spec: str) -> str | None:
    """The engine dtype when ``spec`` names a dense (lossless or bf16) residual, else None."""
    return DENSE.get(spec.strip().lower())


def parse(spec: str) -> Codec:
    """Build a lossy codec from its spec; unknown names and bad parameters raise ConfigError."""
    name, positional, options = parse_options(spec)
    if name not in CODECS:
        raise ConfigError(f"unknown codec {spec!r}; choose one of: {EXAMPLES}")
    return CODECS[name].parse(spec.strip(), positional, options)


def known(name: str) -> bool:
    """Whether a manifest's codec name is one this version can decode (``manifest.LOSSY_CODECS``)."""
    return name in CODECS


def from_manifest(description: dict, tool_version: str = "?") -> Codec:
    """The codec a compressed residual was written with, from the manifest's ``codec_params``.

    A spec this version cannot parse (a parameter added by a later version) is a ManifestError naming
    the version that wrote it, like an unknown codec name.
    """
    spec = description.get("spec")
    try:
        if not isinstance(spec, str):
            raise ConfigError("the manifest records no codec spec")
        return parse(spec)
    except ConfigError as error:
        raise ManifestError(
            f"codec {spec!r} of this residual cannot be read by hf-residual {__version__} ({error}); it was "
            f"written by hf-residual {tool_version}: upgrade to at least that version"
        ) from None
