"""Resolve a model argument (a local folder or a Hub repo id, ``repo@rev``) to a local folder and identity."""

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


def resolve(
    ref: str | Path, revision: str | None = None, *, role: str = "model", token: str | None = None
) -> ResolvedModel:
    """Find ``ref`` on local disk; an ``org/name`` that is not a local folder is fetched from the Hub.

    A Hub revision is pinned to its commit sha once; the sha goes into the identity (manifest, card).
    """
    text, revision = split_revision(str(ref), revision)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedModel(path, ModelIdentity(name=path.name))
    from hf_residual import hub

    if hub.is_repo_id(text):
        return hub.resolve(text, revision, role=role, token=token)
    raise InputNotFoundError(
        f"{role} {text!r}: no such local folder. Give the path of a folder holding config.json and "
        "*.safetensors weights, or a Hub repo id such as org/name"
    )
