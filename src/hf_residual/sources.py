"""Resolve a model argument (a local folder, later also a Hub repo id) to a local folder and identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_residual.errors import InputNotFoundError
from hf_residual.manifest import ModelIdentity


@dataclass(frozen=True)
class ResolvedModel:
    """A model available on local disk, and what to record about where it came from."""

    path: Path
    identity: ModelIdentity


def split_revision(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """``repo@rev`` -> (repo, rev); an explicit ``revision`` wins."""
    if "@" in ref and not Path(ref).exists():
        ref, _, at_revision = ref.rpartition("@")
        revision = revision or at_revision
    return ref, revision


def resolve(ref: str | Path, revision: str | None = None, *, role: str = "model") -> ResolvedModel:
    """Find ``ref`` on local disk. Hub repo ids are resolved by ``hf_residual.hub`` when available."""
    text, revision = split_revision(str(ref), revision)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedModel(path, ModelIdentity(name=path.name))
    raise InputNotFoundError(
        f"{role} {text!r}: no such local folder. Give the path of a folder holding config.json and "
        "*.safetensors weights"
    )
