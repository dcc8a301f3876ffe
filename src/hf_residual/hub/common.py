"""What every module of the Hub layer shares: the errors users meet, repo id shape, resolved models.

Imports only ``errors`` and ``core``; huggingface_hub and the HTTP clients are imported inside functions.
Tokens are passed straight to huggingface_hub and never printed, logged or written anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hf_residual.core.manifest import ModelIdentity
from hf_residual.errors import HubError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


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
    return bool(REPO_ID.fullmatch(text))


@dataclass(frozen=True)
class ResolvedModel:
    """A model available on local disk, and what to record about where it came from."""

    path: Path
    identity: ModelIdentity


def transport_errors() -> tuple[type[Exception], ...]:
    """HTTP client exceptions huggingface_hub may let through (it uses httpx2; older releases httpx)."""
    errors: list[type[Exception]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


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
