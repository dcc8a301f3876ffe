"""Hub downloads against a local Hub (olah offline serving real git repos) with the real huggingface_hub.

Covers: port by repo ids end to end, base found from the card and from the packaged table, revision
pinning, only the needed files downloaded, pickle-only repos refused early, and the error messages of
gated, missing and bad-revision repos.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors, matches, reference_folders
from hubserver import add_family, card
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.cli import main
from hf_residual.errors import PickledWeightsError
from hf_residual.hub import GatedRepoError, HubNetworkError, RepoNotFoundError, RevisionNotFoundError


def _same(a: Path, b: Path) -> bool:
    ta, tb = load_tensors(a), load_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)


def _prefix() -> str:
    return f"org/m{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def expected_port(llama) -> dict[str, torch.Tensor]:
    """What porting the toy family's instruct residual onto its CPT model must give, bit for bit."""
    expected = reference_folders(llama.cpt, llama.instruct, llama.base)
    cpt = load_tensors(llama.cpt)
    # The residual changes every matrix (norm weights may round back to the target's values): a port that
    # skipped it, or used another base, cannot match.
    assert all(not torch.equal(bits(expected[k]), bits(cpt[k])) for k in cpt if cpt[k].ndim == 2)
    return expected


def test_port_by_repo_ids_finds_base_in_card(hub, llama, expected_port, tmp_path):
    ids = add_family(hub, llama, _prefix())
    result = api.port(ids["instruct"], ids["cpt"], tmp_path / "out", progress=False)
    assert result.details["base"] == ids["base"]
    assert "card" in result.details["base_source"]
    assert matches(result.output, expected_port)
    readme = (result.output / "README.md").read_text()
    for role in ("base", "instruct", "cpt"):
        assert hub.head(ids[role]) in readme  # pinned shas in the card
    assert "license: apache-2.0" in readme  # all three parents agree


def test_port_finds_base_in_packaged_table(hub, llama, expected_port, tmp_path, capsys):
    # Real names from the table; the instruct repo has no card, as some repos do not.
    instruct, base = "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M"
    if hub.head(instruct) is None:
        hub.add_repo(instruct, llama.instruct)
        hub.add_repo(base, llama.base)
    target = _prefix() + "-cpt"
    hub.add_repo(target, llama.cpt)
    code = main(["port", instruct, "--to", target, "-o", str(tmp_path / "out"), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"base: {base} (found in hf-residual's table of known pairs" in out
    assert matches(tmp_path / "out", expected_port)


def test_base_flag_wins_over_card(hub, llama, expected_port, tmp_path):
    ids = add_family(hub, llama, _prefix())
    # The card points at the real base; --base names the CPT model instead, so the result must differ.
    result = api.port(
        ids["instruct"], ids["cpt"], tmp_path / "out", base=ids["cpt"], force=True, progress=False
    )
    assert result.details["base_source"] == "given" and result.details["base"] == ids["cpt"]
    assert matches(result.output, reference_folders(llama.cpt, llama.instruct, llama.cpt))
    assert not matches(result.output, expected_port)  # the card's base was not used


def test_revision_pinning(hub, llama, tmp_path):
    ids = add_family(hub, llama, _prefix())
    pinned = hub.head(ids["instruct"])
    first = api.extract(ids["instruct"], output=tmp_path / "r1", instruct_revision=pinned, progress=False)
    manifest = json.loads((first.output / "residual.json").read_text())
    instruct, base = load_tensors(llama.instruct), load_tensors(llama.base)
    exact = {k: (instruct[k].float() - base[k].float()).to(torch.bfloat16) for k in instruct}
    assert matches(first.output, exact)  # I - B of the pinned commit, rounded once to bfloat16
    assert manifest["instruct"]["revision"] == pinned
    assert manifest["instruct"]["repo_id"] == ids["instruct"]
    assert manifest["base"]["revision"] == hub.head(ids["base"])

    # A later commit replaces the instruct weights: the pinned result must not change, main must.
    changed = {}
    for file in sorted(llama.instruct.glob("*.safetensors")):
        tensors = load_tensors_file(file)
        changed[file.name] = _scaled(tensors, tmp_path / file.name)
    hub.add_commit(ids["instruct"], changed, message="new weights")
    again = api.extract(f"{ids['instruct']}@{pinned}", output=tmp_path / "r2", progress=False)
    assert _same(first.output, again.output)
    latest = api.extract(ids["instruct"], output=tmp_path / "r3", progress=False)
    scaled = {k: (instruct[k].float() * 1.5).to(torch.bfloat16) for k in instruct}
    assert matches(
        latest.output, {k: (scaled[k].float() - base[k].float()).to(torch.bfloat16) for k in scaled}
    )
    assert json.loads((latest.output / "residual.json").read_text())["instruct"]["revision"] == hub.head(
        ids["instruct"]
    )


def load_tensors_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(file)


def _scaled(tensors: dict[str, torch.Tensor], path: Path) -> bytes:
    save_file({k: (v.float() * 1.5).to(v.dtype) for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path.read_bytes()


def test_only_needed_files_are_downloaded(hub, llama, tmp_path):
    repo = _prefix() + "-instruct"
    extra = {
        "original/consolidated.pth": b"\0" * 4096,
        "training_args.bin": b"\0" * 2048,
        "notes/big.txt": b"x" * 4096,
        "chat_template.jinja": b"{{ messages }}",
    }
    hub.add_repo(repo, llama.instruct, files=extra)
    model = hub_resolve(repo)
    files = sorted(p.relative_to(model.path).as_posix() for p in model.path.rglob("*") if p.is_file())
    assert "chat_template.jinja" in files and "config.json" in files and "generation_config.json" in files
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.startswith(("original/", "notes/")) or f.endswith(".bin")]
    assert "toy.json" not in files
    assert model.identity.revision == hub.head(repo)


def hub_resolve(repo: str, revision: str | None = None):
    from hf_residual.hub.sources import resolve

    return resolve(repo, revision, role="instruct model")


def test_pickle_only_repo_is_refused_before_download(hub, llama, tmp_path):
    repo = _prefix() + "-pickled"
    hub.add_repo(
        repo,
        files={
            "config.json": (llama.instruct / "config.json").read_bytes(),
            "pytorch_model.bin": b"\0" * 200_000,
        },
    )
    with pytest.raises(PickledWeightsError, match="pickled weights"):
        hub_resolve(repo)
    cached = list(Path(tmp_path / "hf_home").rglob("pytorch_model.bin"))
    assert cached == []


def test_gated_missing_and_bad_revision_messages(hub, llama, tmp_path, capsys):
    ids = add_family(hub, llama, _prefix())
    hub.gated.add(ids["instruct"])
    try:
        with pytest.raises(GatedRepoError, match="Accept its license") as gated:
            api.port(ids["instruct"], ids["cpt"], tmp_path / "o", progress=False)
        assert "hf auth login" in str(gated.value)
    finally:
        hub.gated.discard(ids["instruct"])
    with pytest.raises(RepoNotFoundError, match="no such repo on the Hub, or it is private"):
        api.inspect("org/does-not-exist")
    with pytest.raises(RevisionNotFoundError, match="revision 'no-such-branch' does not exist"):
        api.inspect(ids["base"], revision="no-such-branch")
    code = main(["port", "org/does-not-exist", "--to", ids["cpt"], "-o", str(tmp_path / "o")])
    assert code == 2 and "no such repo on the Hub" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_offline_mode_uses_the_pinned_cache(hub, llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    ids = add_family(hub, llama, _prefix())
    online = hub_resolve(ids["base"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = hub_resolve(ids["base"], online.identity.revision)
    assert offline.path == online.path and offline.identity.revision == online.identity.revision
    with pytest.raises(HubNetworkError, match="HF_HUB_OFFLINE"):
        hub_resolve(ids["instruct"])


def test_card_metadata_unit():
    from hf_residual.hub.base import agreed_license, base_from_card

    assert base_from_card({"base_model": ["a/b"]}, "a/c") == "a/b"
    assert base_from_card({"base_model": ["a/b", "a/d"]}, "a/c") is None
    assert base_from_card({"base_model": "a/b", "base_model_relation": "quantized"}, "a/c") is None
    assert agreed_license([{"license": "mit"}, {"license": "mit"}]) == {"license": "mit"}
    assert agreed_license([{"license": "mit"}, {"license": "apache-2.0"}]) == {}
    assert agreed_license([{"license": "mit"}, {}]) == {}
    assert card("x/y").startswith(b"---\nlicense: apache-2.0\nbase_model: x/y\n")


def test_broken_download_then_rerun_resumes_from_cache(hub, llama, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import file_download

    # huggingface_hub retries a broken read 5 times, 1 s apart; skip the waits, keep the retries.
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda seconds: None))
    repo = _prefix() + "-instruct"
    hub.add_repo(repo, llama.instruct)
    shards = sorted(p.name for p in llama.instruct.glob("*.safetensors"))
    assert len(shards) > 2
    hub.broken_downloads.add(shards[-1])
    try:
        with pytest.raises(HubNetworkError, match="re-run the same command"):
            hub_resolve(repo)
    finally:
        hub.broken_downloads.clear()
    start = len(hub.requests)
    model = hub_resolve(repo)
    fetched = [path.rsplit("/", 1)[-1] for method, path in hub.requests[start:] if method == "GET"]
    assert shards[-1] in fetched
    assert not set(shards[:-1]) & set(fetched)  # already in the cache: not downloaded again
    assert _same(model.path, llama.instruct)


def test_known_pairs_table_covers_the_families_users_expect():
    from hf_residual.hub.base import known_pairs
    from hf_residual.hub.common import REPO_ID

    table = known_pairs()
    for instruct in (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.2-1B-Instruct",
        "meta-llama/Llama-3.3-70B-Instruct",
        "Qwen/Qwen2-7B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen3-8B",
        "google/gemma-2-9b-it",
        "google/gemma-3-4b-it",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "allenai/OLMo-2-1124-7B-Instruct",
    ):
        assert instruct.lower() in table, instruct
    assert table["meta-llama/llama-3.1-8b-instruct"] == "meta-llama/Llama-3.1-8B"
    for instruct, base in table.items():
        assert REPO_ID.fullmatch(base) and instruct != base.lower()
