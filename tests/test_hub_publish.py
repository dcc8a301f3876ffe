"""Publishing against the local Hub: the upload routes are a test double (tests/hubserver/uploads.py)
that writes real git commits, read back through olah and the real huggingface_hub client.

Covers: a residual repo pushed then used as SOURCE by port; a ported model pushed with its lineage card
(read back with ModelCard.load and model_info().card_data); --dry-run uploads nothing; --create-pr;
an upload failed by the server then re-run ends with exactly one complete commit; no write access and
no token; the token never appears in output or files.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors
from hubserver import add_family

from hf_residual import api
from hf_residual.cli import main
from hf_residual.hub import NoWriteAccessError

TOKEN = "hf_localTestToken0123456789"


def _same(a: Path, b: Path) -> bool:
    ta, tb = load_tensors(a), load_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)


@pytest.fixture
def writer(hub, monkeypatch):
    """A user "tester" whose token (in HF_TOKEN, as users set it) may write to tester/ and org/."""
    hub.add_token(TOKEN, "tester", {"org"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def _family(hub, llama) -> dict[str, str]:
    return add_family(hub, llama, f"org/m{uuid.uuid4().hex[:8]}")


def _files_of(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_residual_repo_pushed_then_used_as_source(writer, llama, tmp_path, capsys):
    from huggingface_hub import HfApi, ModelCard, snapshot_download

    hub = writer
    ids = _family(hub, llama)
    repo = f"tester/residual-{uuid.uuid4().hex[:6]}"
    code = main(["extract", ids["instruct"], "--push-to", repo, "-q", "--commit-message", "add residual"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"base: {ids['base']}" in out and "commit:" in out
    assert TOKEN not in out + err
    assert hub.commit_count(repo) == 2  # the repo's initial commit, then exactly one upload

    card = ModelCard.load(repo)
    assert card.data.base_model == [ids["instruct"], ids["base"]]
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert card.data.license == "apache-2.0"
    assert f"hf-residual apply {repo}" in card.text
    info = HfApi().model_info(repo, revision="main")
    assert info.card_data.base_model == [ids["instruct"], ids["base"]]
    assert "hf-residual" in info.card_data.tags
    snapshot = Path(snapshot_download(repo, revision=info.sha))
    assert TOKEN not in _files_of(snapshot)

    # The published residual repo is a SOURCE for port: same result as porting from the models.
    from_repo = api.port(repo, ids["cpt"], tmp_path / "from-repo", progress=False)
    direct = api.port(ids["instruct"], ids["cpt"], tmp_path / "direct", progress=False)
    assert torch.allclose(
        load_tensors(from_repo.output)["model.layers.0.mlp.down_proj.weight"].float(),
        load_tensors(direct.output)["model.layers.0.mlp.down_proj.weight"].float(),
        atol=1e-2,
    )
    local = api.apply(snapshot, llama.cpt, tmp_path / "local-apply", progress=False)
    assert _same(from_repo.output, local.output)


def test_port_pushes_ported_model_with_lineage(writer, llama, tmp_path):
    from huggingface_hub import HfApi, ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM

    hub = writer
    ids = _family(hub, llama)
    repo = f"org/ported-{uuid.uuid4().hex[:6]}"
    result = api.port(ids["instruct"], ids["cpt"], push_to=repo, private=True, progress=False)
    publication = result.details["publication"]
    assert publication.commit_sha == hub.head(repo)
    assert hub.uploads.created[repo]["visibility"] == "private"
    assert not result.output.exists()  # temporary folder removed after the upload

    card = ModelCard.load(repo)
    assert card.data.base_model == [ids["cpt"], ids["instruct"], ids["base"]]
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert card.data.library_name == "transformers"
    assert f'from_pretrained("{repo}")' in card.text
    for role in ("base", "instruct", "cpt"):
        assert hub.head(ids[role]) in card.text
    info = HfApi().model_info(repo, revision="main")
    assert info.card_data.to_dict()["base_model_relation"] == "merge"

    snapshot = Path(snapshot_download(repo, revision=info.sha))
    model = AutoModelForCausalLM.from_pretrained(snapshot)
    assert model.config.model_type == "llama"
    local = api.port(llama.instruct, llama.cpt, tmp_path / "local", base=llama.base, progress=False)
    assert _same(snapshot, local.output)


def test_dry_run_uploads_nothing(writer, llama, tmp_path, capsys, monkeypatch):
    hub = writer
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    ids = _family(hub, llama)
    repo = f"org/dry-{uuid.uuid4().hex[:6]}"
    before = len(hub.uploads.log)
    code = main(["port", ids["instruct"], "--to", ids["cpt"], "--push-to", repo, "--dry-run", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"would upload (commit to {repo})" in out
    assert "model.safetensors" in out and "README.md" in out and "base_model_relation: merge" in out
    assert hub.uploads.log[before:] == []  # not even whoami or repos/create
    assert hub.head(repo) is None


def test_create_pr_leaves_main_alone(writer, llama, tmp_path):
    hub = writer
    ids = _family(hub, llama)
    repo = f"org/pr-{uuid.uuid4().hex[:6]}"
    api.extract(ids["instruct"], output=tmp_path / "r", push_to=repo, progress=False)
    main_before = hub.head(repo)
    result = api.extract(
        ids["instruct"], output=tmp_path / "r2", push_to=repo, create_pr=True, dtype="float32", progress=False
    )
    publication = result.details["publication"]
    assert publication.pr_url and publication.pr_url.endswith("/discussions/1")
    assert hub.head(repo) == main_before
    assert hub.head(repo, "refs/pr/1") == publication.commit_sha


def test_interrupted_upload_then_rerun_makes_one_complete_commit(writer, llama, tmp_path, capsys):
    hub = writer
    ids = _family(hub, llama)
    repo = f"org/retry-{uuid.uuid4().hex[:6]}"
    args = ["port", ids["instruct"], "--to", ids["cpt"], "--push-to", repo, "-o", str(tmp_path / "out"), "-q"]
    hub.uploads.fail_next("commit", status=500)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "nothing was published" in err and "Re-run the same command" in err
    assert hub.commit_count(repo) == 1  # only the repo's initial commit: no partial commit
    assert (tmp_path / "out" / "config.json").exists()  # the verified local output is kept

    lfs_puts_before = sum(1 for method, _ in hub.uploads.log if method == "PUT")
    assert main([*args, "--overwrite"]) == 0
    assert hub.commit_count(repo) == 2
    assert sum(1 for method, _ in hub.uploads.log if method == "PUT") == lfs_puts_before  # not re-sent
    from hubserver.gitrepos import list_files

    published = set(list_files(hub.repo_path(repo)))
    local = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert local <= published


def test_no_write_access_and_no_token(hub, llama, tmp_path, monkeypatch):
    ids = _family(hub, llama)
    with pytest.raises(NoWriteAccessError, match="needs a Hugging Face token"):
        api.port(ids["instruct"], ids["cpt"], push_to="org/x", progress=False)
    hub.add_token("hf_readerToken", "reader")
    with pytest.raises(NoWriteAccessError, match="no write access") as denied:
        api.port(ids["instruct"], ids["cpt"], push_to="org/not-yours", token="hf_readerToken", progress=False)
    assert "hf_readerToken" not in str(denied.value)
    assert hub.head("org/not-yours") is None
