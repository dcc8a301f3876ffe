"""Evaluation without running models: verifiers, offline punkt for lm-eval's IFEval scorer, suites against
lm-eval's installed registry, the comparison table (golden, on the paper's own numbers), plots and cards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from evalhelpers import PAPER_AVERAGES, PAPER_TABLE_3, write_paper_results

from hf_residual.cli import main
from hf_residual.errors import ConfigError
from hf_residual.evaluation import card, suites, verifiers
from hf_residual.evaluation.compare import compare
from hf_residual.evaluation.plots import category_figure
from hf_residual.evaluation.table import build_table, deltas

GOLDEN = Path(__file__).parent / "data" / "eval" / "comparison.md"


# ------------------------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize(
    ("instruction", "good", "bad"),
    [
        ({"id": "uppercase"}, "RED, BLUE AND YELLOW", "Red, blue and yellow"),
        ({"id": "lowercase"}, "the sea is calm.", "The sea is calm."),
        ({"id": "max_words", "n": 5}, "Paris is the capital.", "The capital of France is Paris, of course."),
        ({"id": "min_words", "n": 4}, "one two three four", "one two three"),
        ({"id": "max_sentences", "n": 1}, "One sentence only.", "One. Two."),
        ({"id": "include_keyword", "word": "granite"}, "Granite peaks.", "Grand peaks."),
        ({"id": "exclude_word", "word": "snow"}, "Cold and white.", "Snow falls."),
        ({"id": "no_commas"}, "no commas here", "one, two"),
        ({"id": "wrap_in_quotes"}, '"Fresh bread daily"', "Fresh bread daily"),
        ({"id": "wrap_in_brackets"}, "[apple, pear]", "apple, pear"),
        ({"id": "start_with", "phrase": "Rivers"}, "Rivers are kind.", "They are kind."),
        ({"id": "end_with", "phrase": "That is all."}, "A cat. That is all.", "That is all. A cat."),
        ({"id": "bullet_points", "n": 2}, "* a\n* b", "* a\n* b\n* c"),
        ({"id": "json"}, '```json\n{"name": "Ann", "age": 3}\n```', "{name: Ann}"),
        ({"id": "single_line"}, "Honey.", "Honey.\nAnd wax."),
    ],
)
def test_each_verifier_accepts_and_rejects(instruction, good, bad):
    assert verifiers.follows(instruction, good)
    assert not verifiers.follows(instruction, bad)
    assert not verifiers.follows(instruction, "   ")


def test_loose_scoring_forgives_a_preamble_and_markdown_but_strict_does_not():
    instructions = [{"id": "uppercase"}, {"id": "wrap_in_quotes"}]
    result = verifiers.score(instructions, 'Sure, here it is:\n"**HELLO THERE**"')
    assert result["inst_level_strict_acc"] == [False, False] and not result["prompt_level_strict_acc"]
    assert result["inst_level_loose_acc"] == [True, True] and result["prompt_level_loose_acc"]


def test_offline_data_uses_only_known_instructions():
    folder = Path(suites.__file__).parent / "tasks"
    rows = [json.loads(line) for line in (folder / "if_prompts.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    for row in rows:
        for instruction in row["instructions"]:
            assert instruction["id"] in verifiers.CHECKS, instruction
    facts = [json.loads(line) for line in (folder / "mc_facts.jsonl").read_text().splitlines()]
    assert all(0 <= f["answer"] < len(f["choices"]) for f in facts)


def test_offline_task_yamls_load_local_data_and_score_with_our_verifiers():
    """lm-eval builds the tasks from our YAMLs (no Hub, no defaults) and scores through hooks -> verifiers."""
    from hf_residual.evaluation.runner import task_manager

    manager = task_manager(include_defaults=False)
    names = ["hfr_if_offline", "hfr_mc_offline"]
    tasks = manager.load(names)["tasks"] if hasattr(manager, "load") else manager.load_task_or_group(names)
    generate, choice = tasks["hfr_if_offline"], tasks["hfr_mc_offline"]
    assert (generate.OUTPUT_TYPE, choice.OUTPUT_TYPE) == ("generate_until", "multiple_choice")
    doc = next(iter(generate.test_docs()))
    assert generate.doc_to_text(doc).endswith("Answer in upper case letters only.")
    assert generate.process_results(doc, ["RED, BLUE AND YELLOW"])["prompt_level_strict_acc"] is True
    assert generate.process_results(doc, ["red, blue"])["inst_level_loose_acc"] == [False]
    fact = next(iter(choice.test_docs()))
    assert choice.doc_to_choice(fact)[choice.doc_to_target(fact)] == "honey"
    assert len(list(generate.test_docs())) == 24 and len(list(choice.test_docs())) == 16


# ------------------------------------------------------------------------------- lm-eval's IFEval, offline

IFEVAL_OFFLINE = """
import nltk, sys
nltk.data.path[:] = []                      # no nltk data installed anywhere
def refuse(*a, **k): raise SystemExit("nltk tried to download " + repr(a))
nltk.download = refuse
from hf_residual.evaluation.punkt import use_offline_punkt
print(use_offline_punkt())
from lm_eval.tasks.ifeval import utils
doc = {"key": 1, "prompt": "p", "instruction_id_list": ["length_constraints:number_sentences",
       "change_case:capital_word_frequency"],
       "kwargs": [{"relation": "less than", "num_sentences": 3}, {"capital_relation": "at least", "capital_frequency": 2}]}
ok = utils.process_results(doc, ["Dr. Smith went HOME. He was VERY tired."])
bad = utils.process_results(doc, ["One. Two. Three. Four. all lower case."])
print(ok["inst_level_strict_acc"], bad["inst_level_strict_acc"])
"""


def test_lm_evals_ifeval_scorer_runs_offline_with_the_packaged_punkt():
    """A fresh interpreter with no nltk data and downloads refused scores IFEval's sentence and word checks."""
    done = subprocess.run([sys.executable, "-c", IFEVAL_OFFLINE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    where, scores = done.stdout.strip().splitlines()[-2:]
    assert "hf_residual" in where and "punkt_tab" in where
    # "Dr." is an abbreviation, not a sentence end: 2 sentences < 3; HOME and VERY are 2 capital words.
    assert scores == "[True, True] [False, False]"


# ------------------------------------------------------------------------------------------------ suites


def test_suites_are_packaged_and_named():
    assert {"paper", "quick", "offline-if"} <= set(suites.available())
    assert not suites.load_suite("offline-if").needs_hub
    with pytest.raises(ConfigError, match="offline-if"):
        suites.load_suite("nope")
    assert [(t.task, t.num_fewshot) for t in suites.from_task_list("arc_easy, gsm8k:5").tasks] == [
        ("arc_easy", None),
        ("gsm8k", 5),
    ]
    with pytest.raises(ConfigError, match="TASK:SHOTS"):
        suites.from_task_list("gsm8k:five")


@pytest.fixture(scope="module")
def registry():
    """lm-eval's installed task registry (indexes YAML only; downloads nothing)."""
    from hf_residual.evaluation.runner import task_manager

    return task_manager()


def _config(registry, name: str) -> dict:
    """A task's YAML with its includes merged (lm-eval >= 0.4.10 loader; older releases: lm_eval.utils)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # older lm-eval
        from lm_eval.utils import load_yaml_config

        def load_yaml(path, resolve_func):
            return load_yaml_config(str(path), mode="simple")

    entry = registry.task_index[name]
    return load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg


def test_paper_suite_matches_the_paper_and_lm_evals_registry(registry):
    paper = suites.load_suite("paper")
    shots = {t.task: t.num_fewshot for t in paper.tasks}
    assert shots == {
        "ifeval": 0, "mmlu": 5, "mmlu_pro": 5, "gsm8k": 5, "winogrande": 0,
        "hellaswag": 0, "arc_easy": 0, "piqa": 0, "truthfulqa_mc2": 0,
    }  # fmt: skip
    assert sum(len(t.metrics) for t in paper.tasks) == 16  # the rows of the paper's Tables 2-4
    for spec in paper.tasks:
        assert spec.task in registry.all_tasks, spec.task
        config = _config(registry, spec.task)
        if spec.task in registry.all_groups:  # mmlu, mmlu_pro: check the group's aggregate and a subtask
            aggregates = {a["metric"] for a in config["aggregate_metric_list"]}
            assert {k.split(",")[0] for k in spec.metrics} <= aggregates
            sub = config["task"][0]
            sub = sub if isinstance(sub, str) else sub["task"]
            while sub in registry.all_groups or sub in registry.all_tags:
                if sub in registry.all_tags:
                    sub = next(n for n, e in sorted(registry.task_index.items()) if sub in e.tags)
                else:
                    sub = _config(registry, sub)["task"][0]
            config = _config(registry, sub)
        else:
            names = {m["metric"] for m in config.get("metric_list", [])}
            assert {k.split(",")[0] for k in spec.metrics} <= names, (spec.task, names)
            filters = {f["name"] for f in config.get("filter_list", [])} | {"none"}
            assert {k.split(",")[1] for k in spec.metrics} <= filters, (spec.task, filters)
        if spec.num_fewshot:
            assert (
                config.get("fewshot_split") or config.get("training_split") or config.get("validation_split")
            )
    for name in ("hfr_if_offline", "hfr_mc_offline"):
        assert name in registry.all_tasks


def test_hub_suites_offline_say_so_and_name_the_offline_suite(registry, llama, tmp_path, monkeypatch):
    """With no network the Hub datasets cannot load: a clear error naming offline-if, nothing stored."""
    import datasets

    from hf_residual.evaluation.runner import EvalDataUnavailableError, evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvalDataUnavailableError, match=r"arc_easy.*--suite offline-if"):
        evaluate([str(llama.base)], suites.from_task_list("arc_easy"), tmp_path / "r", batch_size=1,
                 device="cpu", manager=registry)  # fmt: skip
    assert not list((tmp_path / "r").glob("*/*.json"))
    with pytest.raises(ConfigError, match="not in lm-eval's registry"):
        evaluate([str(llama.base)], suites.from_task_list("arc_eesy"), tmp_path / "r", manager=registry)


# ------------------------------------------------------------------------------------------------ compare


def test_table_reproduces_the_papers_averages_and_matches_the_golden_file(tmp_path):
    table = build_table([write_paper_results(tmp_path / "results")])
    assert table.models == list(PAPER_TABLE_3)
    for model, (block1, block2, overall) in PAPER_AVERAGES.items():
        assert table.average(model, "instruction following") == pytest.approx(block1, abs=0.006)
        assert table.average(model, "reasoning") == pytest.approx(block2, abs=0.006)
        assert table.average(model) == pytest.approx(overall, abs=0.006)
    report = compare([tmp_path / "results"], tmp_path / "report", reference="L3i")
    assert report.markdown == GOLDEN.read_text()
    assert (tmp_path / "report" / "comparison.md").read_text() == report.markdown
    assert "L3b+3.1Lr vs L3i: +1.3 average" in report.deltas


def test_each_category_plot_has_one_bar_per_model_and_row(tmp_path):
    import matplotlib.image

    table = build_table([write_paper_results(tmp_path / "results")])
    counts = {"instruction following": 8, "reasoning": 7, "truthfulness": 1}
    for category, rows in counts.items():
        bars = category_figure(table, category).axes[0].patches
        assert len(bars) == rows * 3
        # the heights are the table's values (checked against the paper by the golden test), model by model
        in_category = [r for r in table.rows if r.category == category]
        expected = [table.value(r, m) for m in table.models for r in in_category]
        assert [bar.get_height() for bar in bars] == pytest.approx(expected)
    compare([tmp_path / "results"], tmp_path / "report")
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["instruction-following.png", "reasoning.png", "truthfulness.png"]
    image = matplotlib.image.imread(tmp_path / "report" / "reasoning.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_compare_cli_and_bad_input(tmp_path, capsys):
    results = write_paper_results(tmp_path / "results")
    assert main(["compare", str(results), "-o", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| **Overall** | **average** | 51.64 | 62.94 | **64.25** |" in out and "vs L3b" in out
    assert main(["compare", str(tmp_path / "missing"), "-o", str(tmp_path / "r2")]) == 2
    assert "no such results folder" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert main(["compare", str(results), "-o", str(tmp_path / "r3"), "--reference", "X"]) == 2
    assert "--reference 'X': not a model of the table (L3b, L3i, L3b+3.1Lr)" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_deltas_name_the_largest_changes(tmp_path):
    table = build_table([write_paper_results(tmp_path / "results")])
    text = deltas(table, "L3b")
    assert text.splitlines()[0].startswith(
        "L3i vs L3b: +11.3 average, +22.6 instruction following, -1.1 reasoning"
    )
    assert "IFEval ILL_acc +34.3" in text


# ------------------------------------------------------------------------------------------------- cards

DERIVED_CARD = """---
license: apache-2.0
base_model:
- org/docchat
- org/instruct
- org/base
base_model_relation: merge
tags:
- hf-residual
---

# My ported model

Hand-written text that must survive.
"""


def test_card_merges_results_keeps_the_rest_and_rerun_replaces_its_section(tmp_path):
    from hubserver.uploads import card_metadata_errors
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    model = tmp_path / "L3b+3.1Lr"
    model.mkdir()
    (model / "README.md").write_text(DERIVED_CARD)
    results = write_paper_results(tmp_path / "results", refs={"L3b+3.1Lr": str(model)})
    for _ in range(2):
        update = card.write_card(str(model), [results])
    loaded = ModelCard.load(model / "README.md")
    assert loaded.data.license == "apache-2.0" and loaded.data.base_model[0] == "org/docchat"
    assert "Hand-written text that must survive." in loaded.text
    assert loaded.text.count(card.START) == 1 and "| **Overall** | **average** |" in loaded.text
    assert "**Not measured:** this model is org/docchat" in loaded.text and update.not_measured
    entries = loaded.data.eval_results
    assert len(entries) == 16  # the re-run replaced entries, did not duplicate them
    ill = next(e for e in entries if e.metric_name == "ILL_acc")
    assert (ill.dataset_type, ill.metric_value, ill.dataset_args) == (
        "google/IFEval",
        57.19,
        {"num_few_shot": 0},
    )
    name, parsed = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert name == "L3b+3.1Lr"  # the model's label: its ref is a local folder, not a repo id
    assert sorted(e.metric_value for e in parsed) == sorted(PAPER_TABLE_3["L3b+3.1Lr"])  # its own column
    # what the Hub's validate-yaml route checks (tests/hubserver/uploads.py)
    assert card_metadata_errors((model / "README.md").read_text()) == []
    extra = yaml.safe_load((model / ".eval_results" / "hf-residual.yaml").read_text())
    assert {e["dataset"]["id"] for e in extra} == {"google/IFEval", "openai/gsm8k", "allenai/ai2_arc"}

    card.write_card(str(model), [results], skill_tasks=["truthfulqa_mc2"])
    text = (model / "README.md").read_text()
    assert "Not measured" not in text and "measured by: truthfulqa_mc2" in text


def test_card_keeps_other_results_and_refuses_an_unknown_model(tmp_path):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model = tmp_path / "L3i"
    model.mkdir()
    other = EvalResult(task_type="text-generation", dataset_type="x/y", dataset_name="Other", metric_type="acc",
                       metric_value=1.0)  # fmt: skip
    ModelCard.from_template(ModelCardData(model_name="L3i", eval_results=[other])).save(model / "README.md")
    results = write_paper_results(tmp_path / "results", refs={"L3i": str(model)})
    update = card.write_card(str(model), [results])
    assert not update.not_measured  # not a derived model
    entries = ModelCard.load(model / "README.md").data.eval_results
    assert len(entries) == 17 and entries[0].dataset_type == "x/y"
    with pytest.raises(ConfigError, match="no results for"):
        card.write_card(str(tmp_path / "other"), [results])


def test_a_model_and_task_rerun_with_other_settings_counts_once(tmp_path):
    """After a --limit run and a full run of the same task, tables and cards use the one saved last."""
    import os

    from hf_residual.evaluation.store import ResultsStore

    results = write_paper_results(tmp_path / "results")
    store = ResultsStore(results)
    model = store.models()[0]
    old = next(
        r for r in store.records() if r["model"]["label"] == model.label and r["task"]["task"] == "piqa"
    )
    newer = json.loads(json.dumps(old))
    newer["settings"]["limit"] = 10
    newer["lm_eval"]["results"]["piqa"]["acc,none"] = 0.5
    path = store.save(model, "piqa", "otherkey", newer)
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert len(store.records()) == 3 * 9
    table = build_table([results])
    row = next(r for r in table.rows if r.task == "piqa" and r.metric == "acc")
    assert table.value(row, model.label) == 50.0


def test_a_task_over_local_files_is_recorded_as_local_not_as_a_hub_dataset(tmp_path):
    """lm-eval's ``dataset_path: json`` (a task's own JSONL, as the demo's DocChat task has) names a loader,
    not a Hub dataset: the card must not claim a dataset ``json`` in ``.eval_results``."""
    results = write_paper_results(tmp_path / "results", refs={"L3i": "L3i"})
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/*.json"))]
    record = next(r for r in records if card._dataset_path(r) == "openai/gsm8k")
    assert card.eval_results_yaml([record]) is not None  # a Hub benchmark: listed
    for config in record["lm_eval"]["configs"].values():
        if config.get("dataset_path"):
            config["dataset_path"] = "json"
    task = record["task"]["task"]
    assert card.eval_results_yaml([record]) is None
    assert {e.dataset_type for e in card.eval_results([record], "L3i")} == {
        card.LOCAL_DATASET.format(task=task)
    }
