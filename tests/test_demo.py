"""The demo: format checks, world construction, and a real tiny family trained on CPU end to end.

The tiny profile trains real models (seconds); the slow test runs the quick profile and asserts the
paper's pattern with the required margins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from hf_residual.cli import main
from hf_residual.demo import get_profile, instructions, run_demo, world
from hf_residual.errors import ConfigError


@pytest.mark.parametrize("fmt", instructions.FORMATS)
def test_canonical_replies_pass_their_own_check_and_fail_a_plain_one(fmt):
    reply = instructions.response(fmt, 0, "Zorvan lives in Amsel.", "Amsel")
    assert instructions.check(fmt, reply)
    assert instructions.check_loose(fmt, f"  {reply}\n")
    # A plain sentence with a period and mixed case, repeated once, follows none of the formats.
    plain = "Zorvan lives in Amsel, and that is true"
    assert not instructions.check(fmt, plain)


def test_loose_check_accepts_what_strict_rejects():
    assert not instructions.check("brackets", "Sure:\n[Zorvan lives in Amsel.]")
    assert instructions.check_loose("brackets", "Sure:\n[Zorvan lives in Amsel.]")
    assert not instructions.check_loose("json", "{not json")


# Responses that pass and fail each demo instruction under the one verifier (IFEval's meaning: IFEval's
# checker where one exists, hf_residual.evaluation.verifiers for the rest).
VERDICTS = {
    "upper": (["ZORVAN LIVES IN AMSEL.", "AMSEL 1820"], ["Zorvan lives in Amsel.", "1820", "AMSEl"]),
    "lower": (["zorvan lives in amsel.", "amsel 1820"], ["Zorvan lives in amsel.", "1820"]),
    "brackets": (["[Amsel]", "  [Zorvan lives in Amsel.]\n"], ["[Amsel", "Amsel]", "[", "Sure:\n[Amsel]"]),
    "quotes": (['"Amsel"', ' "Zorvan lives in Amsel." '], ['"Amsel', "'Amsel'", '"']),
    "twice": (
        ["Amsel. Amsel.", "Amsel is here.\nAmsel is here."],
        ["Amsel.", "Amsel. Borda.", "Amsel.Amsel."],
    ),
    # IFEval's detectable_format:json_format: any JSON value, markdown fences stripped.
    "json": (
        ['{"answer": "Amsel"}', '```json\n{"answer": "Amsel"}\n```', "1820", "null", '"Amsel"', "[1, 2]"],
        ["{answer: Amsel}", "Amsel", "{'answer': 'Amsel'}", 'Sure: {"answer": "Amsel"}'],
    ),
    "prefix": (["Answer: Amsel.", "answer: Amsel", ' "Answer: Amsel"'], ["Amsel. Answer:", "Answer Amsel"]),
    # IFEval's number_bullet_lists with 1: exactly one line starting with "* " or "-".
    "bullet": (["- Amsel", "* Amsel", "Sure:\n- Amsel"], ["Amsel", "- Amsel\n- Borda", "**Amsel**"]),
    # The whole word, case ignored (IFEval's keywords:existence would also find it inside "indeedy").
    "keyword0": (["Indeed, Amsel.", "INDEED", "indeed!"], ["Amsel.", "in deed", "indeedy"]),
    "keyword1": (["Clearly Amsel.", "amsel, CLEARLY"], ["Amsel.", "clear", "Clearlyod lives in Amsel."]),
    "keyword2": (["Surely Amsel.", "amsel surely"], ["Amsel. Sure.", "sure", "unsurely"]),
    # IFEval's end_checker: case ignored, trailing spaces and double quotes stripped.
    "end0": (["Amsel. Hope that helps.", "hope that helps."], ["Hope that helps. Amsel.", "Amsel."]),
    "end1": (
        ["Amsel. That is all.", "Amsel. that is all.  ", '"Amsel. That is all."'],
        ["That is all. Amsel."],
    ),
    # IFEval's number_words: words are runs of \w, so "Zorvan's" is two.
    "words1": (["Amsel", "Amsel.", "  Amsel!"], ["Amsel town", "Zorvan's", ""]),
    "words2": (["Amsel town", "Zorvan's"], ["Amsel", "Amsel is here"]),
    "words3": (["Amsel for sure", "Zorvan's town"], ["Amsel for", "It is in Amsel"]),
}


@pytest.mark.parametrize("fmt", instructions.FORMATS)
def test_each_demo_instruction_passes_and_fails_by_ifevals_meaning(fmt):
    good, bad = VERDICTS[fmt]
    assert [r for r in good if not instructions.check(fmt, r)] == []
    assert [r for r in bad if instructions.check(fmt, r)] == []


def test_demo_drift_callback_and_offline_suite_judge_with_the_same_function(monkeypatch):
    """One verifier: the demo, the CPT drift checks and the offline-if suite all call
    hf_residual.evaluation.verifiers and give the same verdicts on the same responses."""
    from hf_residual.cpt import checks as cpt_checks
    from hf_residual.evaluation import verifiers
    from hf_residual.evaluation.tasks import hooks

    docs = {row["key"]: row for row in hooks.load_instructions()["test"]}
    shared = {  # instruction id -> (demo format, drift check, offline-if prompt key)
        "uppercase": ("upper", "upper", 0),
        "json": ("json", "json", 10),
        "wrap_in_brackets": ("brackets", "brackets", 6),
    }
    responses = [
        "{}",
        "1820",
        "null",
        "[Amsel]",
        "AMSEL",
        "Amsel",
        "```json\n[1]\n```",
        "[1, 2]",
        "  ",
        "{a}",
    ]
    calls: list[str] = []
    for name, check in list(verifiers.CHECKS.items()):

        def spy(response, _name=name, _check=check, **arguments):
            calls.append(_name)
            return _check(response, **arguments)

        monkeypatch.setitem(verifiers.CHECKS, name, spy)
    for rule, (fmt, drift, key) in shared.items():
        expected = [verifiers.follows({"id": rule}, r) for r in responses]
        assert json.loads(docs[key]["instructions"]) == [{"id": rule}]
        calls.clear()
        demo = [instructions.check(fmt, r) for r in responses]
        assert calls and set(calls) == {rule}, f"the demo's {fmt} check does not use the verifier"
        calls.clear()
        cpt = [cpt_checks.CHECKS[drift].passes(r) for r in responses]
        assert calls and set(calls) == {rule}, f"the drift check {drift} does not use the verifier"
        calls.clear()
        offline = [hooks.process_instructions(docs[key], [r])["prompt_level_strict_acc"] for r in responses]
        assert calls and set(calls) == {rule}, f"offline-if prompt {key} does not use the verifier"
        assert demo == cpt == offline == expected, rule


def test_pattern_checks_compare_exact_shares_not_rounded_ones():
    """Seed 1 of the quick profile: the ported model kept 22 of the 48 B facts, the CPT'd base knew 44."""
    from hf_residual.demo import report

    prof = get_profile("tiny")
    scores = {
        "base": {"if_strict": 0.0, "know_b": 4 / 48},
        "instruct": {"if_strict": 0.9, "know_b": 5 / 48},
        "cpt-base-S": {"if_strict": 0.0, "know_b": 44 / 48},
        "cpt-instruct-S": {"if_strict": 0.07, "know_b": 45 / 48},
        "ported-S": {"if_strict": 0.72, "know_b": 22 / 48},
    }
    (check,) = report.pattern_checks(report.table_rows(scores, prof), prof)
    assert check["know_b_share_of_cpt_base"] == 0.5 and check["passed"], check
    assert "0.46" in report.text_table(report.table_rows(scores, prof))


def test_world_keeps_eval_combinations_and_b_entities_out_of_chat_data():
    w = world.build_world(seed=3, n_a=12, n_b=6, holdout=0.2, eval_per_set=20)
    trained = {(it.fact, it.fmt) for it in w.sft}
    assert all((it.fact, it.fmt) not in trained for it in w.eval_a)
    b_names = {f.entity for f in w.b_facts}
    assert b_names.isdisjoint(f.entity for f in w.a_facts)
    assert all(it.fact.entity not in b_names for it in w.sft)
    assert {it.fact.entity for it in w.eval_b} <= b_names
    prefix, value = w.b_facts[0].probe()
    assert w.b_facts[0].statement(0) == f"{prefix}{value}."


def test_unknown_profile_and_setting_are_config_errors():
    with pytest.raises(ConfigError, match="choose one of"):
        get_profile("huge")
    with pytest.raises(ConfigError, match="cpt_learning_rate"):
        get_profile("tiny").with_changes(cpt_learning_rate=1.0)


def test_cli_rejects_a_bad_setting_before_building_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--profile", "tiny", "--replay", "1.5", "-o", str(out)]) == 2
    assert "cpt_replay" in capsys.readouterr().err
    assert not out.exists()


def test_balanced_replay_trains_on_the_sum_of_the_two_parts_mean_losses():
    """DocChat's derived model: with_replay(balanced=True) draws the same replay rows as the pooled batch, and
    train() steps on mean(answer tokens' loss) + mean(replay tokens' loss), recomputed here in float32 from
    the logits; the pooled mean (one mean over both) is far from it, the effect the setting exists for."""
    import copy

    import torch

    from hf_residual.demo import training
    from hf_residual.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(["Zorvan lives in Amsel. The bridge stands by the hill."] * 4, 300)
    model = training.new_model(training.ModelShape(32, 1, 2, 64), tok, seed=0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(5, len(tok), (20, 16), generator=gen)
    ids = torch.randint(5, len(tok), (4, 10), generator=gen)
    labels = ids.clone()
    labels[:, :7] = training.IGNORE  # loss on the last 3 tokens (the "answer") only
    batch = {"input_ids": ids, "labels": labels}
    pooled = training.with_replay([batch], rows, 3, seed=1)[0]
    (balanced,) = training.with_replay([batch], rows, 3, seed=1, balanced=True)
    answer, replay = balanced["parts"]
    assert answer is batch and torch.equal(replay["input_ids"], pooled["input_ids"][4:])
    assert torch.equal(replay["labels"], replay["input_ids"])

    def mean_loss(m, part) -> torch.Tensor:
        logits = m(input_ids=part["input_ids"]).logits.float()
        target = part["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=training.IGNORE
        )

    with torch.no_grad():
        expected = float(mean_loss(model, answer) + mean_loss(model, replay))
        pooled_expected = float(mean_loss(model, pooled))
    (got,) = training.train(copy.deepcopy(model), [balanced], training.Schedule(1e-3, 1))
    (got_pooled,) = training.train(copy.deepcopy(model), [pooled], training.Schedule(1e-3, 1))
    assert got == pytest.approx(expected, rel=1e-6) and got_pooled == pytest.approx(pooled_expected, rel=1e-6)
    assert abs(got - got_pooled) > 1.0  # the sum of two means, about twice the pooled mean


def test_models_with_identical_weights_are_evaluated_once(tmp_path):
    """The tuned rows equal the plain port when tune keeps it: the evaluation scores such a folder once (the
    same weights, config and tokenizer), and scores a folder that differs in one bit on its own."""
    import torch
    from safetensors.torch import save_file

    from hf_residual.demo import evaluate

    weights = {"w": torch.arange(6, dtype=torch.float32)}
    paths = {name: tmp_path / name for name in ("ported-L", "tuned-L", "other")}
    for name, path in paths.items():
        path.mkdir()
        (path / "config.json").write_text("{}")
        changed = {"w": weights["w"].clone()}
        if name == "other":
            changed["w"].view(torch.int32)[0] ^= 1  # one bit of one weight
        save_file(changed, path / "model.safetensors")
    calls = []
    scores = evaluate.scores_by_weights(paths, lambda path: calls.append(path.name) or {"of": path.name})
    assert calls == ["ported-L", "other"]
    assert scores == {"ported-L": {"of": "ported-L"}, "tuned-L": {"of": "ported-L"}, "other": {"of": "other"}}


# The tiny family with the DocChat stage and the tuned rows on (the tiny profile leaves both out, for the
# Space's first start), tuned by the tuner `hf-residual demo` passes.
TINY_EXTRAS = {"docchat_train": 1600, "tune_budget": 2}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from hf_residual.commands.demo import demo_tuner

    out = tmp_path_factory.mktemp("demo") / "tiny"
    prof = get_profile("tiny").with_changes(**TINY_EXTRAS)
    return run_demo(out, profile=prof, seed=0, log=lambda _: None, tuner=demo_tuner("tiny", 0))


def test_tuned_rows_come_from_the_tuned_recipe_and_are_no_worse_than_alpha_1(tiny_demo):
    """The tuned rows: `hf-residual tune` searched at the largest CPT size on the demo's probes, its recipe
    ported at every size; on the table's own probes the chosen recipe is no worse than alpha = 1 on both."""
    from hf_residual.demo import cache, report
    from hf_residual.ops.recipe import Recipe

    rows = {r["model"]: r for r in tiny_demo.rows}
    recipe = Recipe.load(tiny_demo.output / "tune" / "recipe.yaml")
    assert cache.read_info(tiny_demo.output / "models" / "tuned-S")["recipe"] == recipe.port_kwargs()
    assert rows["tuned-S"]["role"] == "CPT'd base + residual (tuned recipe)"
    assert rows["tuned-S"]["if_strict"] >= rows["ported-S"]["if_strict"]
    assert rows["tuned-S"]["know_b"] >= rows["ported-S"]["know_b"]
    import matplotlib.pyplot as plt

    fig = report.figure(tiny_demo.rows, get_profile("tiny"))
    try:
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == "base + residual, tuned"
    finally:
        plt.close(fig)


def _greedy_share(model_dir, items: list[dict]) -> float:
    """Share of items whose answer the model completes with its top choice on every token: the definition
    of the skill, computed here with plain torch, independently of lm-eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    for item in items:
        prompt = tok(item["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(item["prompt"] + " " + item["answer"], add_special_tokens=False)["input_ids"][
            len(prompt) :
        ]
        with torch.no_grad():
            guess = model(input_ids=torch.tensor([prompt + answer])).logits.argmax(-1)[0]
        right += guess[len(prompt) - 1 : len(prompt) - 1 + len(answer)].tolist() == answer
    return right / len(items)


def test_docchat_skill_is_measured_as_card_skill_tasks_expects(tiny_demo):
    """DocChat in miniature: the derived model's skill is an lm-eval task run by hf-residual eval's runner,
    its results recorded where `hf-residual card --skill-tasks` reads them, and the derived + residual
    model's card says the skill was measured. The scores equal a plain-torch recomputation of the skill's
    definition, item for item."""
    from hf_residual.demo import docchat, report
    from hf_residual.evaluation.card import model_records

    out, rows = tiny_demo.output, {r["model"]: r for r in tiny_demo.rows}
    task_dir = out / "docchat"
    items = [json.loads(line) for line in (task_dir / f"{docchat.TASK}.jsonl").read_text().splitlines()]
    assert len(items) == get_profile("tiny").docchat_eval
    # the skill is new: the derived model has it, neither base nor instruct does
    assert rows["derived"]["skill"] >= max(rows["base"]["skill"], rows["instruct"]["skill"]) + 0.2
    for name in ("base", "instruct", "derived", "derived-ported"):
        path = out / "models" / name
        (record,) = model_records(list((task_dir / "results").iterdir()), str(path))
        assert record["task"]["task"] == docchat.TASK and record["settings"]["apply_chat_template"] is False
        assert record["lm_eval"]["results"][docchat.TASK][docchat.METRIC] == rows[name]["skill"]
        assert rows[name]["skill"] == _greedy_share(path, items), name
    card = (out / "models" / "derived-ported" / "README.md").read_text()
    assert f"The model's own skill was measured by: {docchat.TASK}." in card
    assert "**Not measured:**" not in card
    data = json.loads((out / "results.json").read_text())
    assert data["docchat"] == report.docchat_check(tiny_demo.rows)
    assert "DocChat in miniature" in (out / "results.md").read_text()
    # a second measurement reads the cached scores beside the models; lm-eval is not run again
    stamps = {n: (out / "models" / n / "demo-skill.json").stat().st_mtime_ns for n in ("derived", "base")}
    paths = {n: out / "models" / n for n in stamps}
    assert docchat.measure_skill(paths, task_dir, "derived") == {n: rows[n]["skill"] for n in stamps}
    assert stamps == {n: (out / "models" / n / "demo-skill.json").stat().st_mtime_ns for n in stamps}


def test_tiny_family_ported_model_follows_instructions_better_than_cpt_instruct(tiny_demo):
    """The method works, not only the code: measured 0.91 (instruct), 0.02 (CPT'd instruct), 0.69 (ported)."""
    rows = {r["model"]: r for r in tiny_demo.rows}
    assert rows["instruct"]["if_strict"] >= rows["base"]["if_strict"] + 0.5
    assert rows["ported-S"]["if_strict"] >= rows["cpt-instruct-S"]["if_strict"] + 0.4
    assert rows["cpt-base-S"]["know_b"] > rows["base"]["know_b"]


def test_tiny_family_is_ordinary_transformers_folders_with_chat_template(tiny_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ported = tiny_demo.output / "models" / "ported-S"
    assert (ported / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(ported)
    model = AutoModelForCausalLM.from_pretrained(ported)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where does X live?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids[0]).endswith("<|assistant|>")
    assert model.config.vocab_size == len(tokenizer)
    data = json.loads((tiny_demo.output / "results.json").read_text())
    assert {r["model"] for r in data["rows"]} == {r["model"] for r in tiny_demo.rows}
    assert (tiny_demo.output / "results.md").read_text().count("| ported-S |") == 1
    assert (tiny_demo.output / "figure.png").stat().st_size > 1000


def test_second_run_reuses_cached_models_and_cli_prints_table(tiny_demo, capsys):
    weights = tiny_demo.output / "models" / "cpt-base-S" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    code = main(["demo", "--profile", "tiny", "-o", str(tiny_demo.output)])
    out = capsys.readouterr().out
    assert code == 0
    assert weights.stat().st_mtime_ns == before
    assert "ported-S" in out and "IF strict" in out and "total" in out
    assert "continual pre-training (CPT)" in out
    # The stage log names the models taken from their cached folders instead of "done in 0.0 s".
    assert "[base pre-training] reused cached base (nothing to train)" in out
    assert "[port (hf_residual.ops.port)] reused cached ported-S" in out
    assert "[base pre-training] done in" not in out
    reused = out.split("reused cached models (settings unchanged): ")[1].splitlines()[0].split(", ")
    assert {"base", "instruct", "cpt-base-S", "cpt-instruct-S", "ported-S"} <= set(reused)


FRESH_RUN = """
import sys
from hf_residual.cli import main
sys.exit(main(["demo", "--profile", "tiny", "-o", sys.argv[1]]))
"""


def _fresh_tiny_demo(folder, hash_seed: int) -> tuple[str, str, dict]:
    """``hf-residual demo --profile tiny`` in a new process: what it printed (less the stage times and the
    folder), results.md, and results.json less its timings."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_RUN, str(folder)], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    start = done.stdout.index("hf-residual demo, profile tiny")
    printed = done.stdout[start : done.stdout.index("\n\n  data ", start)]
    data = json.loads((folder / "results.json").read_text())
    assert data.pop("timings_s") and data.pop("total_s")
    return printed, (folder / "results.md").read_text(), data


def test_two_fresh_demo_runs_print_the_same_table(tmp_path):
    """Deterministic on CPU for a seed, the library versions, the CPU kernels and the thread count, which the
    output names: two fresh processes (different hash seeds, side by side on the machine's cores) print the
    same table and write byte-identical results.md and results.json (less the stage times)."""
    import torch

    from hf_residual.demo import report

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(_fresh_tiny_demo, [tmp_path / "one", tmp_path / "two"], [1, 2])
    assert first == second
    printed, results_md, data = first
    assert "ported-S" in printed and "size S" in printed
    env = data["environment"]
    assert env == report.environment(threads=1)
    assert env["torch"] == torch.__version__ and env["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    named = f"{env['cpu_kernels']} CPU kernels, 1 thread"
    assert (
        f"torch {env['torch']}, transformers" in printed.splitlines()[0] and named in printed.splitlines()[0]
    )
    assert report.environment_text(env) in results_md


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("profile", ["quick", "full"])
def test_profile_shows_the_papers_pattern(tmp_path, profile, seed):
    """The issue's required pattern at every CPT size (checks in report.pattern_checks), for 3 seeds, in the
    quick profile and in full (a model twice as large, ported at alpha 0.9; its DocChat stage, which the
    checks do not read, is left out to keep the slow set short)."""
    prof = get_profile(profile).with_changes(**({"docchat_train": 0} if profile == "full" else {}))
    result = run_demo(tmp_path / profile, profile=prof, seed=seed, log=lambda _: None)
    rows = {r["model"]: r for r in result.rows}
    failed = [c for c in result.checks if not c["passed"]]
    assert not failed, json.dumps(result.checks, indent=1)
    # measured 0.83 / 0.87 / 0.94 (quick) and 0.91 / 0.93 / 0.92 (full) for seeds 0 / 1 / 2
    assert rows["instruct"]["if_strict"] >= 0.7
    # CPT taught B (quick: 0.06 -> 0.90, 0.13 -> 0.58, 0.13 -> 0.88 at the largest size).
    assert rows["cpt-base-L"]["know_b"] >= rows["base"]["know_b"] + 0.3
    if profile == "quick" and seed == 0:
        _assert_readme_shows_this_table(result)


def _assert_readme_shows_this_table(result) -> None:
    """README's demo table is this run's, row for row (its tuned rows need the tuner, which this test does not
    pass): checked where the environment matches the one README names, as README promises."""
    from pathlib import Path

    from hf_residual.demo import report

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("hf-residual demo, profile quick, seed 0 (", 1)[1].split("```", 1)[0]
    env_line, *table = block.strip().splitlines()
    if env_line != report.environment_text(result.environment) + ")":
        return  # other kernels or versions: a cell may move (docs/DEMO.md, "Reproducibility")
    printed = {line.split()[0]: line.split() for line in report.text_table(result.rows).splitlines()[2:]}
    shown = {line.split()[0]: line.split() for line in table[2:]}
    assert {name: shown.get(name) for name in printed} == printed


def test_figure_axes_are_labelled_and_every_legend_entry_is_a_phrase():
    """figure.png's artists, read back before saving: axis labels, and legend entries a reader understands
    (no internal codes such as "org" or a bare size label)."""
    import matplotlib.pyplot as plt

    from hf_residual.demo import report

    prof = get_profile("tiny")
    names = ["base", "instruct"] + [
        f"{k}-{s}" for s in prof.labels for k in ("cpt-base", "cpt-instruct", "ported")
    ]
    rows = [{"model": n, "if_strict": 0.5, "know_b": 0.25} for n in names]
    fig = report.figure(rows, prof)
    try:
        for ax in fig.axes:
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == 1 + len(prof.labels)
        for label in labels:
            assert len(label.split()) >= 3, label
            assert label.split()[0] not in {"org", *prof.labels}, label
    finally:
        plt.close(fig)
