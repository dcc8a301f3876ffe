"""What `eval`, `compare` and `card` promise about their results: a failed run writes nothing, results
computed with --limit say so wherever they are shown, and which punkt scored IFEval is part of a result's key
and of the card. lm-eval itself is replaced by a stand-in here (tests/test_evaluation_flows.py runs it)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from evalhelpers import write_paper_results

from hf_residual.cli import main
from hf_residual.evaluation import card, punkt, runner
from hf_residual.evaluation.compare import compare
from hf_residual.evaluation.store import ResultsStore
from hf_residual.evaluation.suites import from_task_list
from hf_residual.evaluation.table import build_table, to_markdown


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """lm-eval replaced: any task name is known, loading a model is free, every metric scores 0.5."""
    calls = []

    def run_task(lm, spec, limit, chat, gen_kwargs, manager):
        calls.append((spec.task, limit))
        return {"results": {spec.task: {"alias": spec.task, "acc,none": 0.5}}, "configs": {}}

    manager = SimpleNamespace(all_tasks={"hfr_mc_offline", "ifeval"})
    monkeypatch.setattr(runner, "task_manager", lambda *a, **k: manager)
    monkeypatch.setattr(runner, "_load_model", lambda *a, **k: object())
    monkeypatch.setattr(runner, "_run_task", run_task)
    return calls


# ------------------------------------------------------------------------------- a failed run writes nothing


@pytest.mark.parametrize("kind", ["empty", "text"])
def test_eval_of_a_folder_that_is_not_a_model_fails_and_writes_nothing(tmp_path, capsys, kind):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    if kind == "text":
        (folder / "notes.txt").write_text("just some notes\n")
    results = tmp_path / "results"
    code = main(["eval", str(folder), "--tasks", "hfr_mc_offline", "--device", "cpu", "-o", str(results)])
    err = capsys.readouterr().err
    assert code != 0 and "error:" in err and "not-a-model" in err
    assert not results.exists()


def test_a_failed_eval_leaves_an_existing_results_folder_as_it_was(tmp_path, capsys, llama):
    results = write_paper_results(tmp_path / "results")
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    code = main(["eval", str(llama.instruct), str(folder), "--tasks", "hfr_mc_offline", "-o", str(results)])
    assert code != 0 and "not-a-model" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before


def test_a_model_lm_eval_cannot_load_leaves_no_results_folder(tmp_path, capsys, llama, monkeypatch):
    """config.json and weights are there, but transformers does not know the architecture."""
    monkeypatch.setattr(runner, "task_manager", lambda *a, **k: SimpleNamespace(all_tasks={"hfr_mc_offline"}))
    model = tmp_path / "odd-model"
    shutil.copytree(llama.instruct, model)
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    results = tmp_path / "results"
    argv = ["eval", str(model), "--tasks", "hfr_mc_offline", "--device", "cpu", "--batch-size", "1"]
    assert main([*argv, "-o", str(results)]) == 2
    assert "could not load" in capsys.readouterr().err
    assert not results.exists()


# ------------------------------------------------------------------------------ --limit is marked everywhere


def limited_results(tmp_path, limit: int = 10, refs: dict | None = None):
    """The paper's results, with L3i's GSM8K and PIQA re-run (saved last) with --limit."""
    results = write_paper_results(tmp_path / "results", refs=refs)
    store = ResultsStore(results)
    for record in store.records():
        if record["model"]["label"] == "L3i" and record["task"]["task"] in ("gsm8k", "piqa"):
            record["settings"]["limit"] = limit
            model = next(m for m in store.models() if m.label == "L3i")
            store.save(model, record["task"]["task"], f"limited{record['task']['task']}", record)
    return results


def test_eval_table_marks_limited_results(tmp_path, capsys, llama, fake_lm_eval):
    results = tmp_path / "results"
    argv = ["eval", str(llama.instruct), "--tasks", "hfr_mc_offline", "--limit", "3", "-o", str(results)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| hfr_mc_offline | acc | 50.00† |" in out
    assert "† limited run: --limit 3" in out and "not comparable" in out


def test_table_marks_only_limited_cells_and_averages(tmp_path):
    text = to_markdown(build_table([limited_results(tmp_path)]))
    lines = text.splitlines()
    gsm8k = next(line for line in lines if line.startswith("| GSM8K | EM |"))
    assert gsm8k.count("†") == 1 and gsm8k.split("|")[4].strip().endswith("†")  # the L3i column
    ifeval = next(line for line in lines if line.startswith("| IFEval | ILL_acc |"))
    assert "†" not in ifeval
    overall = next(line for line in lines if "**Overall**" in line)
    assert overall.count("†") == 1
    assert "† limited run: --limit 10 (10 examples per task); not comparable to full runs" in text


def test_compare_report_marks_limited_results(tmp_path):
    report = compare([limited_results(tmp_path)], tmp_path / "report", reference="L3b")
    saved = (tmp_path / "report" / "comparison.md").read_text()
    assert "†" in saved and "† limited run: --limit 10" in saved
    deltas = (tmp_path / "report" / "deltas.txt").read_text()
    assert "L3i vs L3b" in deltas and "limited" in deltas.split("L3i vs L3b")[1].splitlines()[0]
    assert "limited" not in deltas.split("L3b+3.1Lr vs L3b")[1].splitlines()[0]
    assert report.markdown == saved


def test_card_of_limited_results_says_so_even_when_its_first_task_was_full(tmp_path):
    from huggingface_hub import ModelCard

    model = tmp_path / "L3i"
    model.mkdir()
    results = limited_results(tmp_path, refs={"L3i": str(model)})
    update = card.write_card(str(model), [results], output=tmp_path / "card")
    text = (tmp_path / "card" / "README.md").read_text()
    assert "limited to 10 examples per task" in text and "not comparable" in text
    limited = [e for e in update.results if e.dataset_name in ("GSM8K", "PIQA")]
    full = [e for e in update.results if e.dataset_name not in ("GSM8K", "PIQA")]
    assert limited and all(e.dataset_args.get("limit") == 10 for e in limited)
    assert all("limit" not in (e.dataset_args or {}) for e in full)
    extra = (tmp_path / "card" / ".eval_results" / "hf-residual.yaml").read_text()
    assert "limited to 10 examples" in extra

    # full runs afterwards: their entries replace the limited ones, and the card no longer says "limited"
    (model / "README.md").write_text((tmp_path / "card" / "README.md").read_text())
    full = write_paper_results(tmp_path / "full", refs={"L3i": str(model)})
    card.write_card(str(model), [full])
    loaded = ModelCard.load(model / "README.md")
    assert len(loaded.data.eval_results) == 16
    assert all("limit" not in (e.dataset_args or {}) for e in loaded.data.eval_results)
    assert "limited to" not in loaded.text and "†" not in loaded.text


# -------------------------------------------------------------------------------- punkt is part of the key


def fake_punkt(tmp_path, monkeypatch, variant: str) -> None:
    """An installed nltk punkt_tab (a copy of the packaged one, edited) ahead of everything else."""
    import nltk

    root = tmp_path / f"nltk-{variant}"
    shutil.copytree(punkt.packaged_nltk_data(), root)
    english = root / "tokenizers" / "punkt_tab" / "english"
    (english / "abbrev_types.txt").write_text(f"{variant}\n", encoding="utf-8")
    monkeypatch.setattr(nltk.data, "path", [str(root)])


def test_which_punkt_scored_ifeval_is_part_of_the_key(tmp_path, monkeypatch, llama, fake_lm_eval):
    import nltk

    suite = from_task_list("ifeval,hfr_mc_offline")
    results = tmp_path / "results"
    monkeypatch.setattr(nltk.data, "path", [])  # no punkt installed: the packaged one
    runner.evaluate([str(llama.instruct)], suite, results, limit=2)
    fake_punkt(tmp_path, monkeypatch, "one")
    runner.evaluate([str(llama.instruct)], suite, results, limit=2)
    fake_punkt(tmp_path, monkeypatch, "two")
    runner.evaluate([str(llama.instruct)], suite, results, limit=2)
    runner.evaluate([str(llama.instruct)], suite, results, limit=2)  # reused
    assert [c[0] for c in fake_lm_eval] == ["ifeval", "hfr_mc_offline", "ifeval", "ifeval"]
    files = sorted((results / "instruct").glob("ifeval-*.json"))
    records = [json.loads(p.read_text()) for p in files]
    assert len({r["key"] for r in records}) == 3
    sources = sorted(r["settings"]["punkt"].split()[0] for r in records)
    assert sources == ["nltk", "nltk", "packaged"]
    (mc,) = (results / "instruct").glob("hfr_mc_offline-*.json")
    assert "punkt" not in json.loads(mc.read_text())["settings"]  # a task without IFEval keeps its key


def test_the_card_states_which_punkt_scored_ifeval(tmp_path, monkeypatch, llama, fake_lm_eval):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    results = tmp_path / "results"
    runner.evaluate([str(llama.instruct)], from_task_list("ifeval"), results)
    card.write_card(str(llama.instruct), [results], output=tmp_path / "card")
    text = (tmp_path / "card" / "README.md").read_text()
    line = next(line for line in text.splitlines() if "punkt" in line)
    assert "IFEval" in line and "hf-residual's packaged punkt" in line
