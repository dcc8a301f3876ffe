"""Publishing against the local Hub: the upload routes are a test double (tests/hubserver/uploads.py)
that writes real git commits, read back through olah and the real huggingface_hub client.

Covers: a residual repo pushed then used as SOURCE by port; a ported model pushed with its lineage card
(read back with ModelCard.load and model_info().card_data); --dry-run uploads nothing; --create-pr;
an upload failed by the server then re-run ends with exactly one complete commit; no write access and
no token; the token never appears in output or files.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors, matches, reference_port
from hubserver import add_family, validate_on_hub

from hf_residual import api
from hf_residual.cli import main
from hf_residual.hub import NoWriteAccessError

TOKEN = "hf_localTestToken0123456789"


@pytest.fixture(scope="module")
def expected(llama) -> dict[str, dict[str, torch.Tensor]]:
    """Independent float32 references: the bfloat16 residual I - B, the port T + (I - B), and T + R with
    that stored residual (what applying the published residual gives)."""
    t, i, b = (load_tensors(p) for p in (llama.cpt, llama.instruct, llama.base))
    residual = {k: (i[k].float() - b[k].float()).to(torch.bfloat16) for k in i}
    port = {k: reference_port(t[k], i[k], b[k], 1.0) for k in t}
    applied = {k: (t[k].float() + residual[k].float()).to(t[k].dtype) for k in t}
    assert all(not torch.equal(bits(port[k]), bits(t[k])) for k in t if t[k].ndim == 2)  # the residual shows
    return {"residual": residual, "port": port, "applied": applied}


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


def test_residual_repo_pushed_then_used_as_source(writer, llama, expected, tmp_path, capsys):
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
    assert matches(snapshot, expected["residual"])  # the published weights are I - B, rounded once
    validate_on_hub(card)  # the metadata passes the (double's) Hub validation

    # The published residual repo is a SOURCE for port: T + R in float32, rounded once; porting from the
    # models adds the exact I - B instead.
    from_repo = api.port(repo, ids["cpt"], tmp_path / "from-repo", progress=False)
    assert matches(from_repo.output, expected["applied"])
    direct = api.port(ids["instruct"], ids["cpt"], tmp_path / "direct", progress=False)
    assert matches(direct.output, expected["port"])


def test_port_pushes_ported_model_with_lineage(writer, llama, expected, tmp_path):
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

    validate_on_hub(card)

    snapshot = Path(snapshot_download(repo, revision=info.sha))
    model = AutoModelForCausalLM.from_pretrained(snapshot)
    assert model.config.model_type == "llama"
    assert matches(snapshot, expected["port"])


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
    from hubserver.gitrepos import git

    # the pull request holds the new (float32) residual, main still the first (bfloat16) one
    manifests = {
        ref: json.loads(git(hub.repo_path(repo), "show", f"{ref}:residual.json"))
        for ref in ("main", "refs/pr/1")
    }
    assert (manifests["main"]["codec"], manifests["refs/pr/1"]["codec"]) == ("bfloat16", "float32")


def test_interrupted_upload_then_rerun_makes_one_complete_commit(writer, llama, expected, tmp_path, capsys):
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
    from huggingface_hub import snapshot_download

    assert matches(Path(snapshot_download(repo)), expected["port"])  # the complete, correct weights


def test_no_write_access_and_no_token(hub, llama, tmp_path, monkeypatch):
    ids = _family(hub, llama)
    with pytest.raises(NoWriteAccessError, match="needs a Hugging Face token"):
        api.port(ids["instruct"], ids["cpt"], push_to="org/x", progress=False)
    hub.add_token("hf_readerToken", "reader")
    with pytest.raises(NoWriteAccessError, match="no write access") as denied:
        api.port(ids["instruct"], ids["cpt"], push_to="org/not-yours", token="hf_readerToken", progress=False)
    assert "hf_readerToken" not in str(denied.value)
    assert hub.head("org/not-yours") is None


def _model_index(result: dict) -> str:
    import yaml

    return yaml.safe_dump({"model-index": [{"name": "m", "results": [result]}]}, sort_keys=False)


_RESULT = {
    "task": {"type": "text-generation"},
    "dataset": {"type": "org/data", "name": "Data"},
    "metrics": [{"type": "acc", "value": 0.5}],
}
INVALID_METADATA = [
    ("license: not-a-license\n", '"license" must be one of the Hub\'s license ids'),
    ("base_model:\n- 3\n", '"base_model" must be a model id or a list of model ids'),
    ("base_model: org/x y\n", '"base_model" must be a model id'),
    ("base_model: org/x\nbase_model_relation: merged\n", '"base_model_relation" must be one of'),
    ("base_model_relation: merge\n", '"base_model_relation" needs a "base_model"'),
    ("tags:\n  a: 1\n", '"tags" must be a string or a list of strings'),
    ("model-index:\n- results: []\n", '"model-index[0]".name is required'),
    (_model_index({**_RESULT, "task": {"name": "gen"}}), '"model-index[0]".results[0].task.type is required'),
    (_model_index({**_RESULT, "dataset": {"type": "org/data"}}), "dataset.name are required"),
    (_model_index({**_RESULT, "metrics": []}), "results[0].metrics must be a non-empty list"),
    (_model_index({**_RESULT, "metrics": [{"type": "acc"}]}), "results[0].metrics[0].value is required"),
    (_model_index({**_RESULT, "metrics": [{"value": 1}]}), "results[0].metrics[0].type is required"),
]


@pytest.mark.parametrize(("metadata", "message"), INVALID_METADATA)
def test_the_hub_double_rejects_invalid_card_metadata(hub, metadata, message):
    """validate-yaml refuses what the Hub refuses (a subset), so a card that passes it means something."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    content = f"---\n{metadata}---\n\n# a model\n"
    response = get_session().post(
        f"{constants.ENDPOINT}/api/validate-yaml", json={"repoType": "model", "content": content}
    )
    assert response.status_code == 400 and message in response.text, response.text
    # One change makes it valid: the same card with a valid block passes.
    fixed = f"---\nlicense: other\nbase_model: org/x\n{_model_index(_RESULT)}---\n\n# a model\n"
    ok = get_session().post(
        f"{constants.ENDPOINT}/api/validate-yaml", json={"repoType": "model", "content": fixed}
    )
    assert ok.status_code == 200, ok.text


def test_model_card_validate_raises_on_what_the_hub_double_refuses(hub):
    """ModelCard.validate()'s request (validate_on_hub: to the double at every huggingface_hub version) fails
    with ValueError on what the double refuses."""
    from hubserver.uploads import card_metadata_errors
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    result = EvalResult(task_type="text-generation", dataset_type="org/data", dataset_name="Data",
                        metric_type="acc", metric_value=0.5)  # fmt: skip
    data = ModelCardData(
        license="apache-2.0", base_model=["org/a", "org/b"], model_name="m", eval_results=[result]
    )
    validate_on_hub(ModelCard.from_template(data))
    with pytest.raises(ValueError, match='"license" must be one of'):
        validate_on_hub(ModelCard("---\nlicense: Apache 2.0\n---\n\n# a model\n"))
    assert card_metadata_errors("---\nlicense: [mit\n---\n")[0].startswith(
        "the YAML front matter does not parse"
    )
    assert card_metadata_errors("---\n- a\n---\n") == ["the YAML front matter must be a mapping"]
    assert card_metadata_errors("# no metadata\n") == []


def test_card_of_a_port_from_local_folders_meets_the_hub_rules(llama, tmp_path):
    """Every parent a local folder: no base_model, so no base_model_relation (the Hub refuses one alone)."""
    from hubserver.uploads import card_metadata_errors

    out = api.port(llama.instruct, llama.cpt, tmp_path / "out", base=llama.base, progress=False).output
    card = (out / "README.md").read_text()
    assert "base_model_relation" not in card
    assert card_metadata_errors(card) == []
