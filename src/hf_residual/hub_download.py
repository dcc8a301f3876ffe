"""Resolve ``repo@revision`` to a commit sha once, then download only the needed files at that sha.

Downloads go to the normal Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) with huggingface_hub's
progress bars, so a re-run after a broken download resumes from what is already cached. A repo with only
pickled weights is refused after listing its files, before anything large is downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_residual.assets import GENERATION_CONFIG, INSTRUCT_CONFIG, TOKENIZER_FILES, TOKENIZER_FOLDERS
from hf_residual.errors import PickledWeightsError
from hf_residual.hub import (
    LOGIN_HINT,
    GatedRepoError,
    HubFileNotFoundError,
    HubNetworkError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from hf_residual.manifest import MANIFEST_NAME, WEIGHTS_PREFIX, ModelIdentity

REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SMALL_FILES = (
    "config.json",
    GENERATION_CONFIG,
    INSTRUCT_CONFIG,
    MANIFEST_NAME,
    "README.md",
    *TOKENIZER_FILES,
)


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
def hub_errors(repo_id: str, revision: str | None, role: str, *, token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into HubError subclasses that say what to do."""
    from huggingface_hub import errors as hf

    where = f"{role} {repo_id}" + (f"@{revision}" if revision else "")
    try:
        yield
    except hf.GatedRepoError:  # subclasses RepositoryNotFoundError: catch it first
        raise GatedRepoError(
            f"{where}: the repo is gated. Accept its license on https://huggingface.co/{repo_id} while logged "
            f"in, then {LOGIN_HINT} with the account that accepted it"
        ) from None
    except hf.RevisionNotFoundError:
        raise RevisionNotFoundError(_bad_revision(repo_id, revision, role)) from None
    except hf.RepositoryNotFoundError:
        if revision and _repo_exists_at_main(repo_id, token):
            raise RevisionNotFoundError(_bad_revision(repo_id, revision, role)) from None
        raise RepoNotFoundError(
            f"{where}: no such repo on the Hub, or it is private. Check the spelling (org/name); for a "
            f"private repo, {LOGIN_HINT}. For a local folder, check that the path exists"
        ) from None
    except hf.RemoteEntryNotFoundError as error:
        raise HubFileNotFoundError(f"{where}: a needed file is missing from the repo ({error})") from None
    except hf.OfflineModeIsEnabled:
        raise HubNetworkError(
            f"{where}: HF_HUB_OFFLINE is set and the files are not in the local cache; unset HF_HUB_OFFLINE "
            "or download them first"
        ) from None
    except (hf.LocalEntryNotFoundError, hf.HfHubHTTPError, *transport_errors()) as error:
        response = getattr(error, "response", None) if isinstance(error, hf.HfHubHTTPError) else None
        if response is not None and response.status_code in (401, 403):
            raise RepoNotFoundError(f"{where}: access denied; {LOGIN_HINT}") from None
        raise HubNetworkError(
            f"{where}: the download failed ({type(error).__name__}). Check your connection and re-run the "
            "same command: files already downloaded stay in the Hugging Face cache and are not fetched again"
        ) from None


def _bad_revision(repo_id: str, revision: str | None, role: str) -> str:
    return (
        f"{role} {repo_id}: revision {revision!r} does not exist. Use a branch, tag or full commit sha shown "
        f"on https://huggingface.co/{repo_id}/commits/main (omit --revision for the main branch)"
    )


def _repo_exists_at_main(repo_id: str, token: str | None) -> bool:
    """Some servers answer "repo not found" for a bad revision: ask again at main to tell them apart."""
    from huggingface_hub import HfApi

    try:
        HfApi(token=token).model_info(repo_id, revision="main")
        return True
    except Exception:  # any failure here means we cannot tell; report the repo as missing
        return False


def weight_files(files: list[str]) -> list[str]:
    """The safetensors files (and index) a job reads, following the same prefixes as ``checkpoint``."""
    top = [f for f in files if "/" not in f]
    prefix = WEIGHTS_PREFIX if MANIFEST_NAME in top else "model"
    chosen = [
        f for f in top if f.startswith(prefix) and f.endswith((".safetensors", ".safetensors.index.json"))
    ]
    if not chosen:
        chosen = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    return chosen


def needed_files(files: list[str]) -> list[str]:
    """Weights plus config, generation config, tokenizer, chat templates, manifest and card."""
    small = [f for f in files if f in SMALL_FILES or f.split("/")[0] in TOKENIZER_FOLDERS]
    return sorted(set(weight_files(files)) | set(small))


def check_weights(repo_id: str, files: list[str], role: str) -> None:
    """Refuse before downloading when there are no safetensors weights."""
    if any(f.endswith(".safetensors") for f in weight_files(files)):
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise PickledWeightsError(
            f"{role} {repo_id}: has only pickled weights ({', '.join(pickled[:3])}); hf-residual never "
            "unpickles weights (loading a pickle can run code). Use a revision with *.safetensors weights, "
            "or convert the model to safetensors yourself from a source you trust"
        )
    raise HubFileNotFoundError(f"{role} {repo_id}: the repo has no *.safetensors weights at this revision")


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set in the environment since."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def cached_snapshot(repo_id: str, revision: str | None, role: str) -> Path:
    """With HF_HUB_OFFLINE: the cached snapshot of ``repo_id`` at a sha, or at a branch/tag seen before."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref = folder / "refs" / revision
    sha = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / sha
    if not snapshot.is_dir():
        raise HubNetworkError(
            f"{role} {repo_id}@{revision}: no local folder of that name, HF_HUB_OFFLINE is set, and this "
            f"revision is not in the local cache ({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download "
            "it, or pass a revision cached before"
        )
    return snapshot


def resolve_repo(repo_id: str, revision: str | None, *, role: str, token: str | None = None):
    """Pin ``repo_id@revision`` to a commit sha, then fetch only the needed files at that sha."""
    from huggingface_hub import HfApi, snapshot_download

    from hf_residual.sources import ResolvedModel

    if offline():
        path = cached_snapshot(repo_id, revision, role)
        sha = path.name
    else:
        with hub_errors(repo_id, revision, role, token=token):
            # A revision is always passed: one request pins it, and some mirrors need it.
            info = HfApi(token=token).model_info(repo_id, revision=revision or "main")
        files = [s.rfilename for s in info.siblings or []]
        check_weights(repo_id, files, role)
        sha = info.sha
        with hub_errors(repo_id, revision, role, token=token):
            path = Path(
                snapshot_download(repo_id, revision=sha, allow_patterns=needed_files(files), token=token)
            )
    identity = ModelIdentity(name=repo_id.rsplit("/", 1)[-1], repo_id=repo_id, revision=sha)
    return ResolvedModel(path, identity)
