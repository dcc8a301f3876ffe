"""Evaluation end to end through lm-eval on tiny real models (hf_residual.toy, real tokenizer and chat
template): the offline suite's generate_until task scored by our verifiers and its multiple-choice
loglikelihood task, results reused on a re-run, then compare and card; a Hub model evaluated at its pinned
sha and its card pushed to the local Hub (tests/hubserver), as the publish workflow does.
"""

from __future__ import annotations

import json
import uuid

import pytest
from evalhelpers import write_paper_results
from hubserver import add_family, validate_on_hub

from hf_residual.cli import main

TOKEN = "hf_localTestToken0123456789"
LIMIT = "2"


@pytest.fixture(scope="module")
def evaluated(llama, tmp_path_factory):
    """The instruct and base toy models evaluated on offline-if (2 examples per task) through the CLI."""
    results = tmp_path_factory.mktemp("eval") / "results"
    argv = ["eval", str(llama.instruct), str(llama.base), "--suite", "offline-if", "--limit", LIMIT]
    argv += ["--batch-size", "1", "--device", "cpu", "--gen-kwargs", "max_gen_toks=24", "-o", str(results)]
    assert main(argv) == 0
    return argv, results


def test_offline_suite_runs_both_task_kinds_through_lm_eval(evaluated):
    _, results = evaluated
    models = json.loads((results / "models.json").read_text())
    assert [m["label"] for m in models] == ["instruct", "base"]
    assert all(len(m["sha"]) == 64 for m in models)  # local folders: sha256 of weights, config, tokenizer
    for model in models:
        records = [json.loads(p.read_text()) for p in sorted((results / model["label"]).glob("*.json"))]
        assert sorted(r["task"]["task"] for r in records) == ["hfr_if_offline", "hfr_mc_offline"]
        for record in records:
            task = record["task"]["task"]
            scores = record["lm_eval"]["results"][task]
            assert scores["sample_len"] == int(LIMIT)
            for key in record["task"]["metrics"]:
                assert 0.0 <= scores[key] <= 1.0, (task, key)
            # the instruct model has a chat template (applied), the base model none
            assert record["settings"]["apply_chat_template"] is (model["label"] == "instruct")
            assert record["settings"]["gen_kwargs"] == "max_gen_toks=24"
            assert record["lm_eval"]["configs"][task]["output_type"] == (
                "generate_until" if task == "hfr_if_offline" else "multiple_choice"
            )


def test_rerun_reuses_finished_results(evaluated, capsys):
    argv, results = evaluated
    files = {p: p.stat().st_mtime_ns for p in results.glob("*/*.json")}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0 run, 4 reused" in out and "| Offline IF | ILL_acc |" in out
    assert {p: p.stat().st_mtime_ns for p in results.glob("*/*.json")} == files


def test_compare_and_card_from_real_results(evaluated, tmp_path, capsys, llama):
    _, results = evaluated
    assert main(["compare", str(results), "-o", str(tmp_path / "report")]) == 0
    assert "base vs instruct" in (tmp_path / "report" / "deltas.txt").read_text()
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == {
        "instruction-following.png",
        "reasoning.png",
    }
    out = tmp_path / "card"
    assert main(["card", str(llama.instruct), "--results", str(results), "-o", str(out)]) == 0
    from huggingface_hub import ModelCard

    loaded = ModelCard.load(out / "README.md")
    assert {e.dataset_type for e in loaded.data.eval_results} == {
        "hf-residual/hfr_if_offline",
        "hf-residual/hfr_mc_offline",
    }
    assert "limited to 2 examples per task" in loaded.text
    scores = []
    for path in sorted((results / "instruct").glob("*.json")):
        record = json.loads(path.read_text())
        values = record["lm_eval"]["results"][record["task"]["task"]]
        scores += [round(100 * values[key], 2) for key in record["task"]["metrics"]]
    assert sorted(e.metric_value for e in loaded.data.eval_results) == sorted(scores)  # the instruct model's
    assert not (out / ".eval_results").exists()  # no Hub benchmark among the offline tasks


def test_hub_model_evaluated_at_its_sha_and_card_pushed(hub, llama, tmp_path, monkeypatch, capsys):
    """The publish workflow's two steps: eval a Hub repo (pinned sha), then card --push; and --create-pr."""
    from huggingface_hub import HfApi, ModelCard

    hub.add_token(TOKEN, "tester", {"org"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ids = add_family(hub, llama, f"org/e{uuid.uuid4().hex[:8]}")
    repo = ids["cpt"]
    results = tmp_path / "results"
    argv = [
        "eval",
        repo,
        "--tasks",
        "hfr_mc_offline",
        "--limit",
        LIMIT,
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    assert main([*argv, "-o", str(results)]) == 0
    sha = HfApi().model_info(repo, revision="main").sha
    models = json.loads((results / "models.json").read_text())
    assert models == [{"label": repo.split("/")[1], "ref": repo, "sha": sha, "repo_id": repo}]

    commits = hub.commit_count(repo)
    assert main(["card", repo, "--results", str(results), "--push"]) == 0
    assert "commit:" in capsys.readouterr().out
    assert hub.commit_count(repo) == commits + 1
    loaded = ModelCard.load(repo)
    assert loaded.data.license == "apache-2.0" and loaded.data.base_model == ids["base"]  # kept
    assert "# test model" in loaded.text and "## Evaluation" in loaded.text
    assert [(e.dataset_name, e.metric_name) for e in loaded.data.eval_results] == [
        ("hfr_mc_offline", "acc"),
        ("hfr_mc_offline", "acc_norm"),
    ]
    record = json.loads(next((results / models[0]["label"]).glob("*.json")).read_text())
    scores = record["lm_eval"]["results"]["hfr_mc_offline"]
    assert [e.metric_value for e in loaded.data.eval_results] == [
        round(100 * scores["acc,none"], 2),
        round(100 * scores["acc_norm,none"], 2),
    ]
    # The Hub's YAML validation route (the double checks a subset of its rules and refuses invalid cards:
    # tests/test_hub_publish.py::test_the_hub_double_rejects_invalid_card_metadata).
    validate_on_hub(loaded)

    # --create-pr: a pull request, main untouched
    write_paper_results(tmp_path / "paper", refs={"L3i": repo})
    assert main(["card", repo, "--results", str(tmp_path / "paper"), "--create-pr"]) == 0
    assert "pull request:" in capsys.readouterr().out
    assert hub.commit_count(repo) == commits + 1
    from hubserver.gitrepos import git

    proposed = git(hub.repo_path(repo), "show", "refs/pr/1:README.md")
    assert (
        "53.36" in proposed and "53.36" not in ModelCard.load(repo).text
    )  # L3i's IFEval ILL, in the PR only
    assert ".eval_results/hf-residual.yaml" not in HfApi().list_repo_files(repo)


def test_card_push_needs_a_repo_id(evaluated, llama, capsys):
    _, results = evaluated
    assert main(["card", str(llama.instruct), "--results", str(results), "--push"]) == 2
    assert "local folder" in capsys.readouterr().err


def test_eval_runs_a_users_task_folder_from_the_cli(llama, tmp_path, capsys):
    """``--include-path``: a user's own lm-eval task (here the demo's DocChat task, written as a user
    would: a YAML and its JSONL) runs through the CLI; a folder that does not exist is a clear error."""
    from hf_residual.demo import docchat

    items = [docchat.DocItem("Ana Vel lives in Oslo.", "Where does Ana Vel live?", "Oslo")] * 2
    tasks = docchat.write_task(tmp_path / "tasks", items)
    out = tmp_path / "results"
    argv = ["eval", str(llama.instruct), "--tasks", docchat.TASK, "--chat-template", "no", "--device", "cpu"]
    argv += ["--batch-size", "1", "--gen-kwargs", "max_gen_toks=4", "-o", str(out)]
    assert main([*argv, "--include-path", str(tasks)]) == 0
    [record] = [json.loads(p.read_text()) for p in (out / "instruct").glob("*.json")]
    assert record["task"]["task"] == docchat.TASK
    assert docchat.METRIC in record["lm_eval"]["results"][docchat.TASK]
    capsys.readouterr()
    assert main([*argv, "--include-path", str(tmp_path / "nowhere")]) == 2
    assert "--include-path" in capsys.readouterr().err
