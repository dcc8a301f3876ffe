"""Shared fixtures: hermetic Hugging Face environment and tiny real model families built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_residual.toy import ToyFamily, build_family

# CI sets HF_RESIDUAL_FAIL_ON_SKIP=1: a test that skips (a tool or package missing) fails instead.
pytest_plugins = ["strict_skips"]


@pytest.fixture(autouse=True)
def hermetic_hf(tmp_path_factory, monkeypatch):
    """Point every Hugging Face cache and token at a temporary folder; no real token, no network."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE_FOR_TESTS", "1"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


_FAMILIES: dict[tuple, ToyFamily] = {}


def make_family(root: Path, arch: str = "llama", dtype: str = "bfloat16", **kwargs) -> ToyFamily:
    """Build (once per session and settings) a tiny family; tests must not modify it."""
    key = (arch, dtype, tuple(sorted(kwargs.items())))
    if key not in _FAMILIES:
        name = "-".join([arch, dtype] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
        _FAMILIES[key] = build_family(root / name, arch, dtype, **kwargs)
    return _FAMILIES[key]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda arch="llama", dtype="bfloat16", **kw: make_family(root, arch, dtype, **kw)


@pytest.fixture(scope="session")
def llama(families) -> ToyFamily:
    return families("llama", "bfloat16", max_shard_size="20KB")


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A local Hub for the session: olah (offline) serving git repos, plus the upload test double."""
    from hubserver import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("local_hub")).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(local_hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at the local Hub for one test: fresh cache, no token, online."""
    from hubserver import use_hub

    use_hub(local_hub, monkeypatch, tmp_path)
    return local_hub
