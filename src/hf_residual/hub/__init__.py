"""The Hub layer: from a model argument to a local folder, and from a verified folder to a Hub repo.

Modules, one job each: ``common`` (errors, repo id shape, ``ResolvedModel``), ``sources`` (a local folder
or ``org/name@revision`` -> a local folder and identity), ``download`` (pin a revision to a sha, fetch only
the needed files into the HF cache), ``base`` (find the base of an instruct model; licenses from cards),
``publish`` (one commit or PR with a verified folder), ``cards`` (model cards of results). Imports flow
from ``errors`` and ``core`` only; huggingface_hub is imported inside the functions that use it.
"""

from hf_residual.hub.common import (
    LOGIN_HINT,
    GatedRepoError,
    HubFileNotFoundError,
    HubNetworkError,
    NoWriteAccessError,
    RepoNotFoundError,
    ResolvedModel,
    RevisionNotFoundError,
    is_repo_id,
    progress_bars,
)

__all__ = [
    "LOGIN_HINT",
    "GatedRepoError",
    "HubFileNotFoundError",
    "HubNetworkError",
    "NoWriteAccessError",
    "RepoNotFoundError",
    "ResolvedModel",
    "RevisionNotFoundError",
    "is_repo_id",
    "progress_bars",
]
