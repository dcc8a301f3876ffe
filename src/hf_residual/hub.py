"""Hugging Face Hub access: errors users meet, and the entry points used by ``sources`` and ``api``.

The work is split by job: ``hub_download`` (repo id + revision -> pinned sha -> only the needed files in
the normal HF cache), ``hub_base`` (find the base of an instruct model) and ``hub_publish`` (one commit or
PR with a verified folder). Tokens are passed straight to huggingface_hub and never printed, logged or
written anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hf_residual.errors import HubError


class GatedRepoError(HubError):
    """The repo is gated: its license must be accepted on the model page before downloading."""


class RepoNotFoundError(HubError):
    """No such repo, or a private one this token cannot see."""


class RevisionNotFoundError(HubError):
    """The repo exists but the branch, tag or commit does not."""


class HubFileNotFoundError(HubError):
    """A file the job needs is not in the repo at that revision."""


class HubNetworkError(HubError):
    """The Hub could not be reached, or a transfer broke off; re-running resumes."""


class NoWriteAccessError(HubError):
    """Publishing needs a token with write access to the target namespace."""


LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token"


def is_repo_id(text: str) -> bool:
    """``org/name`` (optionally ``@revision``): the shape of a Hub model id, not of a local path."""
    from hf_residual.hub_download import REPO_ID

    return bool(REPO_ID.fullmatch(text))


def resolve(repo_id: str, revision: str | None, *, role: str, token: str | None = None):
    """Pin ``repo_id@revision`` to a commit sha and download only what the job needs."""
    from hf_residual.hub_download import resolve_repo

    return resolve_repo(repo_id, revision, role=role, token=token)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's download/upload progress bars off while ``enabled`` is False (``-q``)."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
