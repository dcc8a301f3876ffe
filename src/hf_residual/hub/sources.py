"""Resolve a model argument (a local folder or a Hub repo id, ``repo@rev``) to a local folder and identity."""

from __future__ import annotations

from pathlib import Path

from hf_residual.core.manifest import ModelIdentity
from hf_residual.errors import InputNotFoundError
from hf_residual.hub.common import ResolvedModel, is_repo_id


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
    if is_repo_id(text):
        from hf_residual.hub.download import resolve_repo  # huggingface_hub: only for a Hub id

        return resolve_repo(text, revision, role=role, token=token)
    raise InputNotFoundError(
        f"{role} {text!r}: no such local folder. Give the path of a folder holding config.json and "
        "*.safetensors weights, or a Hub repo id such as org/name"
    )
