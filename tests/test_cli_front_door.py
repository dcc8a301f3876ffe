"""The command line's front door: ``--json`` results for scripts, suggestions for mistyped commands and
options, help on every option, metric names explained where shown, ``apply`` reporting the target's
distance like ``port``, and ``eval`` keeping lm-eval's and git's noise off the screen (shown with
``--verbose``).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from evalhelpers import PAPER_AVERAGES, write_paper_results
from hubserver import add_family

from hf_residual import api
from hf_residual.cli import build_parser, main

TOKEN = "hf_localTestToken0123456789"


def run_json(argv: list[str], capsys) -> dict:
    """Run the CLI with --json: exit 0, and stdout is one JSON object and nothing else."""
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def safetensors_contents(folder: Path, pattern: str) -> tuple[int, int]:
    """(tensors, data bytes) in the folder's safetensors files, read from their headers."""
    tensors = data = 0
    for path in folder.glob(pattern):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        tensors += len(header)
        data += sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    return tensors, data


def files_of(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def residual(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("front") / "residual"
    api.extract(llama.instruct, llama.base, out, progress=False)
    return out


# ------------------------------------------------------------------------------------------------ --json


def test_extract_json(llama, tmp_path, capsys):
    out = tmp_path / "residual"
    data = run_json(["extract", str(llama.instruct), "--base", str(llama.base), "-o", str(out)], capsys)
    assert data["command"] == "extract" and data["output"] == str(out.absolute()) and out.is_dir()
    assert (data["tensors"], data["bytes"]) == safetensors_contents(out, "residual*.safetensors")
    assert data["files"] == files_of(out) and "residual.json" in data["files"]
    assert data["codec"] == "bfloat16" and data["lossless"] is False and data["base_source"] == "given"
    manifest = json.loads((out / "residual.json").read_text())
    assert data["models"]["instruct"]["name"] == "instruct"
    assert data["models"]["base"]["fingerprint"] == manifest["base"]["fingerprint"]
    assert data["publication"] is None and data["seconds"] > 0


def test_port_and_apply_json_report_the_same_output_and_distance(llama, residual, tmp_path, capsys):
    ported = tmp_path / "ported"
    port = run_json(
        ["port", str(llama.instruct), "--base", str(llama.base), "--to", str(llama.cpt), "-o", str(ported)],
        capsys,
    )
    applied = tmp_path / "applied"
    apply = run_json(["apply", str(residual), "--to", str(llama.cpt), "-o", str(applied)], capsys)
    for data, folder in ((port, ported), (apply, applied)):
        assert data["output"] == str(folder.absolute()) and (folder / "config.json").is_file()
        assert (data["tensors"], data["bytes"]) == safetensors_contents(folder, "model*.safetensors")
        assert data["files"] == files_of(folder)
        assert data["alpha"] == 1.0 and data["temporary_output"] is False
    assert (port["command"], apply["command"]) == ("port", "apply")
    # the CPT toy model is a real descendant of its base: a small, non-zero distance, the same both ways
    assert 0 < port["distance"] < 0.3
    assert apply["distance"] == pytest.approx(port["distance"], rel=1e-6)
    # the models each resolved: local folders, so a path and no repo id or sha
    for role, folder in (("instruct", llama.instruct), ("base", llama.base), ("target", llama.cpt)):
        model = port["models"][role]
        assert model["path"] == str(folder.absolute()) and model["name"] == folder.name
        assert model["repo_id"] is None and model["revision"] is None
    assert apply["models"]["target"]["path"] == str(llama.cpt.absolute())
    assert apply["models"]["instruct"]["name"] == "instruct" and apply["models"]["base"]["name"] == "base"


def test_apply_prints_the_targets_distance_like_port(llama, residual, tmp_path, capsys):
    assert main(["apply", str(residual), "--to", str(llama.cpt), "-o", str(tmp_path / "a"), "-q"]) == 0
    applied = capsys.readouterr().out
    argv = ["port", str(llama.instruct), "--base", str(llama.base), "--to", str(llama.cpt)]
    assert main([*argv, "-o", str(tmp_path / "p"), "-q"]) == 0
    ported = capsys.readouterr().out
    distance = ported.split("|target - base| / |base| = ")[1].split()[0]
    assert f"|target - base| / |base| = {distance}" in applied


def test_inspect_json(llama, residual, capsys):
    data = run_json(["inspect", str(residual), str(llama.base)], capsys)
    assert data["command"] == "inspect"
    first, second = data["items"]
    assert (first["kind"], second["kind"]) == ("residual", "model")
    assert first["path"] == str(residual.absolute()) and second["ref"] == str(llama.base)
    assert first["tensors"] == safetensors_contents(residual, "residual*.safetensors")[0]
    assert second["tensors"] == safetensors_contents(llama.base, "*.safetensors")[0]
    assert second["bytes"] == safetensors_contents(llama.base, "*.safetensors")[1]
    assert first["residual"]["codec"] == "bfloat16" and first["residual"]["base"]["name"] == "base"
    assert "layer 0" in first["layer_norms"] and all(v >= 0 for v in first["layer_norms"].values())
    assert second["residual"] is None and second["layer_norms"] == {}
    assert first["repo_id"] is None and first["revision"] is None  # local folders


def test_extract_and_inspect_json_record_the_pinned_shas_of_hub_models(
    hub, llama, tmp_path, monkeypatch, capsys
):
    from huggingface_hub import HfApi

    hub.add_token(TOKEN, "tester", {"org"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ids = add_family(hub, llama, f"org/j{uuid.uuid4().hex[:8]}")
    data = run_json(["extract", ids["instruct"], "-o", str(tmp_path / "r"), "-q"], capsys)
    assert data["base"] == ids["base"] and data["base_source"] != "given"  # found from the instruct card
    for role in ("instruct", "base"):
        identity = data["models"][role]
        assert identity["repo_id"] == ids[role]
        assert identity["revision"] == HfApi().model_info(ids[role], revision="main").sha
    argv = ["port", ids["instruct"], "--base", ids["base"], "--to", ids["cpt"], "-o", str(tmp_path / "p")]
    models = run_json([*argv, "-q"], capsys)["models"]  # port records the sha it resolved for each model
    for role, repo in (("instruct", ids["instruct"]), ("base", ids["base"]), ("target", ids["cpt"])):
        assert models[role]["repo_id"] == repo and Path(models[role]["path"]).is_dir()
        assert models[role]["revision"] == HfApi().model_info(repo, revision="main").sha
        assert len(models[role]["revision"]) == 40
    (item,) = run_json(["inspect", ids["cpt"]], capsys)["items"]
    assert item["repo_id"] == ids["cpt"] and item["ref"] == ids["cpt"] and item["kind"] == "model"
    assert item["revision"] == HfApi().model_info(ids["cpt"], revision="main").sha


def test_compare_json(tmp_path, capsys):
    results = write_paper_results(tmp_path / "results")
    data = run_json(["compare", str(results), "-o", str(tmp_path / "report"), "--reference", "L3i"], capsys)
    assert data["report_dir"] == str((tmp_path / "report").absolute())
    assert all(Path(p).is_file() for p in data["files"]) and len(data["files"]) == 5
    table = data["table"]
    assert [m["label"] for m in table["models"]] == list(PAPER_AVERAGES)
    for model, (block1, block2, overall) in PAPER_AVERAGES.items():
        averages = table["averages"][model]
        assert averages["instruction following"] == pytest.approx(block1, abs=0.006)
        assert averages["reasoning"] == pytest.approx(block2, abs=0.006)
        assert averages["overall"] == pytest.approx(overall, abs=0.006)
    ifeval = table["rows"][0]
    assert (ifeval["benchmark"], ifeval["metric"]) == ("IFEval", "ILL_acc")
    assert ifeval["values"] == {"L3b": 19.06, "L3i": 53.36, "L3b+3.1Lr": 57.19}
    assert table["legend"]["ILL_acc"].startswith("instruction-level loose accuracy")
    ported = next(d for d in data["deltas"] if d["model"] == "L3b+3.1Lr")
    assert ported["reference"] == "L3i" and round(ported["averages"]["overall"], 1) == 1.3  # as deltas.txt


# ------------------------------------------------------------------------------------------------ eval

NOISE = (
    "fatal: not a git repository",  # lm-eval's `git describe` of the current folder
    "Passed argument batch_size",  # the hf backend's print() on stdout
    "Determined largest batch size",
    "Custom kwargs can be passed",  # lm-eval's warning for tasks with their own dataset loader
    "specified through cli",  # lm-eval's warning about --gen-kwargs
)


def eval_argv(llama, output: Path) -> list[str]:
    # batch size auto (the default): the hf backend prints its detection
    argv = ["eval", str(llama.instruct), "--tasks", "hfr_mc_offline", "--limit", "1", "--device", "cpu"]
    return [*argv, "--gen-kwargs", "max_gen_toks=4", "-o", str(output)]


@pytest.fixture
def outside_git(tmp_path, monkeypatch) -> Path:
    """A current folder that is no git repository (where lm-eval's `git describe` complains)."""
    monkeypatch.chdir(tmp_path)
    found = subprocess.run(["git", "rev-parse"], capture_output=True, check=False)
    assert found.returncode != 0, "the test folder is inside a git repository"
    return tmp_path


def test_eval_shows_our_progress_and_results_only_and_json(llama, outside_git, capfd):
    from hf_residual.evaluation.runner import folder_sha

    results = outside_git / "results"
    assert main(eval_argv(llama, results)) == 0
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out and noise not in err, noise
    assert "instruct / hfr_mc_offline: running lm-eval" in out and "| hfr_mc_offline | acc |" in out
    assert "1 run, 0 reused" in out

    assert main([*eval_argv(llama, results), "--json"]) == 0
    out, err = capfd.readouterr()
    data = json.loads(out)
    assert "instruct / hfr_mc_offline: reusing" in err  # our progress, on stderr with --json
    assert (data["command"], data["results_dir"], data["run"], data["reused"]) == (
        "eval",
        str(results.absolute()),
        0,
        1,
    )
    (model,) = data["models"]
    assert (
        model["sha"]
        == folder_sha(llama.instruct)
        == json.loads((results / "models.json").read_text())[0]["sha"]
    )
    (run,) = data["runs"]
    stored = json.loads(Path(run["path"]).read_text())
    assert stored["model"]["sha"] == model["sha"] and run["reused"] is True
    scores = stored["lm_eval"]["results"]["hfr_mc_offline"]
    assert run["metrics"] == {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}
    row = next(r for r in data["table"]["rows"] if r["metric"] == "acc")
    assert row["values"] == {"instruct": 100 * scores["acc,none"]} and row["limits"] == {"instruct": 1}


def test_eval_verbose_shows_lm_evals_messages_on_stderr(llama, outside_git, capfd):
    assert main([*eval_argv(llama, outside_git / "results"), "--verbose"]) == 0
    out, err = capfd.readouterr()
    assert "Passed argument batch_size" in err and "Custom kwargs can be passed" in err
    assert "[lm_eval.evaluator]" in err  # lm-eval's INFO logs
    assert "Passed argument batch_size" not in out and "| hfr_mc_offline | acc |" in out
    assert "fatal: not a git repository" not in err  # git's complaint about the user's folder: never shown


# ------------------------------------------------------------------------------------------------ parsing


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in [("hf-residual", parser), *subparsers(parser)]
        for action in sub._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["extrct"], "did you mean 'extract'?"),
        (["inspetc", "x"], "did you mean 'inspect'?"),
        (["port", "s", "--to", "t", "-o", "o", "--alpah", "2"], "--alpah: did you mean --alpha?"),
        (["inspect", "x", "--revison", "main"], "--revison: did you mean --revision?"),
        # a required option mistyped: said beside argparse's "required" error
        (["eval", "m", "--suite", "quick", "--ouput", "r"], "--ouput: did you mean --output?"),
        (["eval", "m", "--suite", "paperr", "-o", "r"], "did you mean 'paper'?"),
        (["--debgu", "inspect", "x"], "--debgu: did you mean --debug?"),
    ],
)
def test_a_mistyped_command_or_option_suggests_the_closest(argv, hint, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert hint in err and "usage: hf-residual" in err


def test_only_options_with_a_close_one_get_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["inspect", "x", "--frobnicate", "--revison", "main"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --frobnicate --revison main (--revison: did you mean --revision?)" in err


# ------------------------------------------------------------------------------------------------ legend


def test_metric_names_are_explained_in_tables_reports_and_cards(tmp_path, capsys):
    from hf_residual.evaluation.card import write_card

    model = tmp_path / "L3i"
    model.mkdir()
    results = write_paper_results(tmp_path / "results", refs={"L3i": str(model)})
    explained = (
        "ILL_acc = instruction-level loose accuracy",
        "PLS_acc = prompt-level strict accuracy",
        "strict-EM = ",
        "acc_n = ",
    )
    assert main(["compare", str(results), "-o", str(tmp_path / "report")]) == 0
    shown = capsys.readouterr().out
    report = (tmp_path / "report" / "comparison.md").read_text()
    write_card(str(model), [results])
    card = (model / "README.md").read_text()
    for text in (shown, report, card):
        for phrase in explained:
            assert phrase in text, phrase


def test_card_of_a_model_without_a_card_shows_no_empty_metadata_notice(tmp_path, capfd):
    model = tmp_path / "L3i"
    model.mkdir()  # no README.md: huggingface_hub logs that the card has no metadata block
    results = write_paper_results(tmp_path / "results", refs={"L3i": str(model)})
    assert main(["card", str(model), "--results", str(results)]) == 0
    out, err = capfd.readouterr()
    assert "card of " in out and (model / "README.md").is_file()
    assert "metadata block was not found" not in out + err


def test_a_failure_with_json_is_a_json_object_too(llama, tmp_path, capsys):
    argv = ["port", str(llama.instruct), "--base", str(llama.base), "--to", str(tmp_path / "missing")]
    code = main([*argv, "-o", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "error: " in err  # the message on stderr as without --json
    failure = json.loads(out)
    assert failure["command"] == "port" and failure["error"]["exit_code"] == code
    assert failure["error"]["type"] == "InputNotFoundError" and "missing" in failure["error"]["message"]
