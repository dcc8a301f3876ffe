"""Publish a verified output folder as one commit (or one pull request) on the Hub.

The commit is built with ``create_commit``: large files go up first, and the commit that makes them
visible is created last, all at once. A failure before that leaves no partial commit, and a re-run skips
files the Hub already holds. ``dry_run`` lists what would be uploaded and touches no network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.errors import ConfigError
from hf_residual.hub.common import (
    LOGIN_HINT,
    REPO_ID,
    HubNetworkError,
    NoWriteAccessError,
    RepoNotFoundError,
    transport_errors,
)


@dataclass
class Publication:
    """What was (or, for a dry run, would be) uploaded."""

    repo_id: str
    files: list[tuple[str, int]]
    card: str
    dry_run: bool
    create_pr: bool = False
    private: bool | None = None
    commit_message: str = ""
    commit_sha: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        """A listing for the terminal: target, files and sizes, and the card (never the token)."""
        what = "pull request on" if self.create_pr else "commit to"
        lines = [f"{'would upload' if self.dry_run else 'uploaded'} ({what} {self.repo_id}):"]
        lines += [f"  {path}  ({size:,} bytes)" for path, size in self.files]
        if self.dry_run:
            lines += [f"commit message: {self.commit_message}", "--- README.md ---", self.card.rstrip()]
        else:
            lines.append(f"commit: {self.commit_url or self.commit_sha}")
            if self.pr_url:
                lines.append(f"pull request: {self.pr_url}")
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id or ""):
        raise ConfigError(
            f"--push-to {repo_id!r}: give a Hub repo id as namespace/name, e.g. my-org/my-model"
        )
    return repo_id


def list_files(folder: Path) -> list[tuple[str, int]]:
    """Every file of ``folder`` as (path in repo, size), sorted."""
    return [
        (p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()
    ]


@contextmanager
def upload_errors(repo_id: str) -> Iterator[None]:
    """Map upload failures to messages that say what happened on the Hub and what to do."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"cannot publish to {repo_id}: the repo could not be created or seen with this token; {LOGIN_HINT} "
            "with an account that may write to that namespace"
        ) from None
    except hf.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise NoWriteAccessError(
                f"cannot publish to {repo_id}: no write access (HTTP {status}). Use a token with write access "
                f"to that namespace: {LOGIN_HINT}"
            ) from None
        raise HubNetworkError(_interrupted(repo_id, f"HTTP {status}")) from None
    except (RuntimeError, *transport_errors()) as error:
        raise HubNetworkError(_interrupted(repo_id, type(error).__name__)) from None


def _interrupted(repo_id: str, why: str) -> str:
    return (
        f"upload to {repo_id} failed ({why}) before its commit was made: nothing was published. Re-run the "
        "same command (with --overwrite if you kept the output with -o); files the Hub already received are "
        "not sent again"
    )


def check_token(token: str | None) -> None:
    """Fail before any work when publishing is asked for and no token can be found."""
    from huggingface_hub import get_token

    if not (token or get_token()):
        raise NoWriteAccessError(f"publishing needs a Hugging Face token with write access: {LOGIN_HINT}")


def publish(
    folder: Path,
    repo_id: str,
    *,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> Publication:
    """Upload every file of ``folder`` to ``repo_id`` in one commit (or PR); nothing at all if ``dry_run``."""
    check_repo_id(repo_id)
    folder = Path(folder)
    files = list_files(folder)
    card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    message = commit_message or f"Upload {folder.name} with hf-residual"
    result = Publication(repo_id, files, card, dry_run, create_pr, private, message)
    if dry_run:
        return result
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with upload_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path, folder / path) for path, _ in files]
        info = api.create_commit(repo_id, operations, commit_message=message, create_pr=create_pr)
    result.commit_sha, result.commit_url, result.pr_url = info.oid, info.commit_url, info.pr_url
    return result
