"""Resolve ``repo@revision`` to a commit sha once, then download only the needed files at that sha.

Downloads go to the normal Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) with huggingface_hub's
progress bars, so a re-run after a broken download resumes from what is already cached. A repo with only
pickled weights is refused after listing its files, before anything large is downloaded.

Which weight files are fetched follows ``checkpoint.select_weight_files``, the rule a local folder is read
with: the ``*.safetensors.index.json`` first (only the shards it names), then ``model.safetensors``, then
variants in name order. Other namings beside them (Mistral's ``consolidated.safetensors``, Llama's
``original/*.pth``, ``model.fp16.safetensors``) are neither downloaded nor read, and never make a repo refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_residual.core.assets import GENERATION_CONFIG, INSTRUCT_CONFIG, TOKENIZER_FILES, TOKENIZER_FOLDERS
from hf_residual.core.checkpoint import PICKLE_SUFFIXES, WeightSelection, select_weight_files
from hf_residual.core.fp8 import gguf_message
from hf_residual.core.manifest import MANIFEST_NAME, WEIGHTS_PREFIX, ModelIdentity
from hf_residual.errors import CorruptCheckpointError, IncompatibleModelsError, PickledWeightsError
from hf_residual.hub.common import (
    LOGIN_HINT,
    GatedRepoError,
    HubFileNotFoundError,
    HubNetworkError,
    RepoNotFoundError,
    ResolvedModel,
    RevisionNotFoundError,
    transport_errors,
)

LOG = logging.getLogger(__name__)
SMALL_FILES = (
    "config.json",
    GENERATION_CONFIG,
    INSTRUCT_CONFIG,
    MANIFEST_NAME,
    "README.md",
    *TOKENIZER_FILES,
)


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


def weight_prefix(files: list[str]) -> str:
    """``residual`` for a residual repo (it holds the manifest), else ``model``."""
    return WEIGHTS_PREFIX if MANIFEST_NAME in files else "model"


def select_weights(
    repo_id: str, sha: str, files: list[str], role: str, *, token: str | None = None
) -> WeightSelection:
    """``checkpoint.select_weight_files`` on the repo's listing; an index it picks is downloaded (small)."""
    from huggingface_hub import hf_hub_download

    def read_index(name: str) -> dict:
        with hub_errors(repo_id, sha, role, token=token):
            path = Path(hf_hub_download(repo_id, name, revision=sha, token=token))
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(f"{role} {repo_id}: {name} is not a valid index ({error})") from None

    selection = select_weight_files(files, weight_prefix(files), read_index)
    missing = [f for f in selection.files if f not in files]
    if missing:
        raise HubFileNotFoundError(
            f"{role} {repo_id}: {selection.index} names shard(s) the repo does not hold: {', '.join(missing[:3])}"
        )
    return selection


def needed_files(files: list[str], selection: WeightSelection) -> list[str]:
    """The chosen weights (and their index) plus config, generation config, tokenizer, chat templates,
    manifest and card; never pickles, never other weight variants, never subfolders such as ``original/``."""
    small = [f for f in files if f in SMALL_FILES or f.split("/")[0] in TOKENIZER_FOLDERS]
    weights = [*selection.files, *([selection.index] if selection.index else [])]
    return sorted(set(weights) | set(small))


def check_weights(repo_id: str, files: list[str], selection: WeightSelection, role: str) -> None:
    """Refuse before downloading when there are no safetensors weights (pickles anywhere are ignored)."""
    if selection.files:
        return
    gguf = [f for f in files if f.endswith(".gguf")]
    if gguf:  # llama.cpp's quantized format: say so, and what to use instead
        raise IncompatibleModelsError(gguf_message(f"{role} {repo_id}", gguf))
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

    if offline():
        path = cached_snapshot(repo_id, revision, role)
        sha = path.name
    else:
        with hub_errors(repo_id, revision, role, token=token):
            # A revision is always passed: one request pins it, and some mirrors need it.
            info = HfApi(token=token).model_info(repo_id, revision=revision or "main")
        files = [s.rfilename for s in info.siblings or []]
        sha = info.sha
        selection = select_weights(repo_id, sha, files, role, token=token)
        check_weights(repo_id, files, selection, role)
        if selection.unused:
            LOG.info("%s %s: downloading %s", role, repo_id, selection.describe())
        with hub_errors(repo_id, revision, role, token=token):
            path = Path(
                snapshot_download(
                    repo_id, revision=sha, allow_patterns=needed_files(files, selection), token=token
                )
            )
    identity = ModelIdentity(name=repo_id.rsplit("/", 1)[-1], repo_id=repo_id, revision=sha)
    return ResolvedModel(path, identity)
