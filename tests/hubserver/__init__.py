"""A local Hub for tests: olah in offline mode serving git repos, plus an upload-route test double."""

from __future__ import annotations

from pathlib import Path

from .server import LocalHub

__all__ = ["LocalHub", "add_family", "card", "use_hub", "validate_on_hub"]


def use_hub(hub: LocalHub, monkeypatch, cache_root: Path) -> None:
    """Point huggingface_hub at ``hub`` for one test, with a fresh cache and no saved token.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and the cache and token paths
    once, at import, into ``huggingface_hub.constants``: setting the environment is not enough once it is
    imported, so both the environment (for anything imported later) and the constants are patched.
    """
    from huggingface_hub import constants

    cache = cache_root / "hf_home"
    values = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(cache),
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_TOKEN_PATH": str(cache / "token"),
        "HF_STORED_TOKENS_PATH": str(cache / "stored_tokens"),
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(cache))


def card(base_model: str | list[str] | None = None, license: str | None = "apache-2.0", **extra) -> bytes:
    """A README.md with YAML front matter, as model repos on the Hub carry."""
    import yaml

    data = {k: v for k, v in {"license": license, "base_model": base_model, **extra}.items() if v is not None}
    return f"---\n{yaml.safe_dump(data, sort_keys=False)}---\n\n# test model\n".encode()


def add_family(hub: LocalHub, family, prefix: str, *, instruct_card: bool = True) -> dict[str, str]:
    """Publish a toy family as ``prefix-base``, ``prefix-instruct``, ``prefix-cpt``; returns role -> repo id.

    The instruct and CPT cards name the base in ``base_model`` (unless ``instruct_card`` is False), all
    under apache-2.0, as real model repos do.
    """
    ids = {role: f"{prefix}-{role}" for role in ("base", "instruct", "cpt")}
    hub.add_repo(ids["base"], family.base, files={"README.md": card()})
    instruct_files = {"README.md": card(ids["base"])} if instruct_card else {}
    hub.add_repo(ids["instruct"], family.instruct, files=instruct_files)
    hub.add_repo(ids["cpt"], family.cpt, files={"README.md": card(ids["base"])})
    return ids


def validate_on_hub(repo_card, repo_type: str | None = None) -> None:
    """``card.validate()``, sent to the Hub that ``huggingface_hub.constants.ENDPOINT`` names (the double).

    Before huggingface_hub 2.2.0, ``RepoCard.validate()`` posts to https://huggingface.co/api/validate-yaml
    whatever HF_ENDPOINT says (hermetic tests cannot reach it); from 2.2.0 on it posts to
    ``constants.ENDPOINT``. This sends the request ``validate()`` sends (same body and headers) to
    ``constants.ENDPOINT`` at every version, and fails as it does: ``ValueError`` with the Hub's text when it
    answers 400 (the double's ``card_metadata_errors`` decide), ``HfHubHTTPError`` for any other error.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError, get_session, hf_raise_for_status

    body = {"repoType": repo_type or repo_card.repo_type, "content": str(repo_card)}
    response = get_session().post(
        f"{constants.ENDPOINT}/api/validate-yaml", json=body, headers={"Accept": "text/plain"}
    )
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError:
        if response.status_code == 400:
            raise ValueError(response.text) from None
        raise
