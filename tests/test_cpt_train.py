"""Continual pre-training end to end on a tiny real Llama: packed corpus, schedule, callbacks, resume."""

from __future__ import annotations

import json

import pytest
import torch
import trl  # noqa: F401  (the [cpt] extra: a broken install must fail here, not skip)
import yaml
from datasets import Dataset
from helpers import bits, load_tensors, reference_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_residual import api
from hf_residual.cli import main
from hf_residual.cpt.callbacks import InstructionDriftCallback
from hf_residual.cpt.config import config_from_dict
from hf_residual.cpt.train import run_cpt
from hf_residual.errors import ConfigError

NEWS = [
    "The council of Quellport voted on Monday to build a new bridge over the river Amsel.",
    "Storms closed the harbour for two days; fishermen said prices at the market doubled.",
    "The school board approved a budget with more teachers and a smaller tax rise.",
    "A quick brown fox was seen near the town hall, to the delight of the children.",
]


@pytest.fixture(scope="module")
def setup(families, tmp_path_factory):
    family = families("llama", "float32")
    root = tmp_path_factory.mktemp("cpt")
    Dataset.from_dict({"text": NEWS * 6}).save_to_disk(root / "corpus")
    Dataset.from_dict({"text": ["Old text about tensors and residuals."] * 8}).save_to_disk(root / "old")
    residual = api.extract(family.instruct, family.base, root / "residual", dtype="float32", progress=False)
    return family, root, residual.output


def base_config(family, root, out, **extra) -> dict:
    return {
        "model": str(family.cpt),
        "corpus": str(root / "corpus"),
        "output_dir": str(out),
        "seq_len": 64,
        "batch_size": 2,
        "max_steps": 8,
        "save_steps": 4,
        "logging_steps": 1,
        "schedule": {"type": "wsd", "learning_rate": 3e-3, "warmup_steps": 2, "decay_steps": 2},
        "training_args": {"use_cpu": True, "disable_tqdm": True},
        **extra,
    }


def test_training_lowers_loss_and_callbacks_port_and_log(setup, tmp_path):
    family, root, residual = setup
    config = base_config(
        family,
        root,
        tmp_path / "run",
        replay={"corpus": str(root / "old"), "share": 0.2},
        eval_steps=4,
        residual_port={"residual": str(residual)},
        instruction_drift={
            "residual": str(residual),
            "prompts": ["Where is Quellport?"],
            "checks": ["upper", "words3"],
            "max_new_tokens": 4,
        },
    )
    result = run_cpt(config)
    assert result.global_step == 8 and not result.port_failures
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.3, losses  # repeated documents are learnt

    rates = [e["learning_rate"] for e in result.log_history if "learning_rate" in e]
    peak = max(rates)
    assert peak == pytest.approx(3e-3) and rates[0] < peak and rates[-1] < peak  # re-warm, stable, re-decay
    assert sum(r == pytest.approx(peak) for r in rates) >= 2

    assert [p.name for p in result.ported] == ["ported-checkpoint-4", "ported-checkpoint-8"]
    ported = result.ported[0]
    AutoModelForCausalLM.from_pretrained(ported)  # loadable
    checkpoint = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    ported_weights = load_tensors(ported)
    instruct, base = load_tensors(family.instruct), load_tensors(family.base)
    # Every tensor is checkpoint + (I - B) in float32, bit for bit (the float32 residual is exact here).
    assert ported_weights.keys() == checkpoint.keys()
    for name, trained in checkpoint.items():
        expected = reference_port(trained, instruct[name], base[name], 1.0)
        assert torch.equal(bits(ported_weights[name]), bits(expected)), name
    # the checkpoint was trained, so matching it shows the port used the checkpoint, not the starting model
    assert not torch.equal(checkpoint["model.norm.weight"], load_tensors(family.cpt)["model.norm.weight"])
    assert json.loads((ported / "config.json").read_text())["model_type"] == "llama"

    drift = [e for e in result.log_history if "drift/raw/all" in e]
    assert len(drift) == 2 and all("drift/ported/all" in e and "drift/raw/upper" in e for e in drift)
    scores = [v for e in drift for k, v in e.items() if k.startswith("drift/")]
    assert len(scores) >= 12 and all(0.0 <= v <= 1.0 for v in scores)  # shares of replies passing a check


def test_port_failure_is_logged_not_raised(setup, tmp_path):
    family, root, _ = setup
    config = base_config(
        family,
        root,
        tmp_path / "run",
        max_steps=2,
        save_steps=2,
        schedule={"type": "constant"},
        residual_port={"residual": str(tmp_path / "no")},
    )
    result = run_cpt(config)
    assert result.global_step == 2 and result.ported == []
    assert [step for step, _ in result.port_failures] == [2]
    message = result.port_failures[0][1]
    assert str(tmp_path / "no") in message, message  # names the residual that could not be used


def test_resume_from_checkpoint_via_cli(setup, tmp_path, capsys):
    family, root, _ = setup
    out = tmp_path / "run"
    path = tmp_path / "cpt.yaml"
    path.write_text(
        yaml.safe_dump(base_config(family, root, out, schedule={"type": "cosine", "learning_rate": 1e-3}))
    )
    assert main(["cpt", "--config", str(path), "--max-steps", "4"]) == 0
    assert (out / "checkpoint-4").is_dir()
    assert main(["cpt", "--config", str(path), "--max-steps", "6", "--resume"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the first run, nothing was trained twice


def test_bad_configs_are_clear_errors(setup, tmp_path, capsys):
    family, root, _ = setup
    with pytest.raises(ConfigError, match="unknown setting"):
        config_from_dict(base_config(family, root, tmp_path, learning_rat=1))
    with pytest.raises(ConfigError, match="replay share"):
        config_from_dict(base_config(family, root, tmp_path, replay={"corpus": "x", "share": 1.5}))
    with pytest.raises(ConfigError, match="exceed max_steps"):
        config_from_dict(base_config(family, root, tmp_path, max_steps=3)).scheduler_arguments()
    with pytest.raises(ConfigError, match="unknown instruction checks"):
        InstructionDriftCallback(checks=["shout"])
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(base_config(family, root, tmp_path / "o", corpus=str(tmp_path / "none.txt")))
    )
    assert main(["cpt", "--config", str(path)]) == 2
    assert "corpus file(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _yaml_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def test_documented_configs_load(tmp_path):
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    cpt_yaml, fsdp_yaml = _yaml_blocks((Path(__file__).parents[1] / "docs" / "CPT.md").read_text())
    config = config_from_dict(yaml.safe_load(cpt_yaml))
    assert config.scheduler_arguments()["lr_scheduler_type"] == "warmup_stable_decay"
    (tmp_path / "fsdp.yaml").write_text(fsdp_yaml)
    cluster = ClusterConfig.from_yaml_file(str(tmp_path / "fsdp.yaml"))
    assert (
        cluster.distributed_type == "FSDP"
        and cluster.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        and cluster.fsdp_config["fsdp_version"] == 2
    )


def test_instruction_checks_judge_form():
    from hf_residual.cpt.checks import CHECKS, score

    cases = {
        "upper": ("PARIS IS THE CAPITAL.", "Paris is the capital."),
        "lower": ("paris.", "Paris."),
        "words3": ("It is Paris.", "It is Paris indeed."),
        "max10": ("Paris.", " ".join(["word"] * 11)),
        "keyword": ("Indeed, Paris.", "Paris."),
        "brackets": ("[Paris]", "Paris]"),
        "json": ('{"answer": "Paris"}', "answer: Paris"),
        "prefix": ("Answer: Paris", "Paris"),
    }
    assert set(cases) == set(CHECKS)
    for name, (good, bad) in cases.items():
        assert CHECKS[name].passes(good) and not CHECKS[name].passes(bad), name
    checks = [CHECKS["upper"], CHECKS["json"]]
    replies = {("q1", "upper"): "YES", ("q2", "upper"): "no", ("q1", "json"): "{}", ("q2", "json"): "{}"}
    assert score(replies, checks) == {"all": 0.75, "upper": 0.5, "json": 1.0}


def test_drift_callback_in_a_plain_trainer_scores_raw_when_port_fails(setup, tmp_path):
    """Used outside run_cpt (not attached): figures go to state.log_history; a failed port is skipped."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from hf_residual.cpt.packing import packing_collator, prepare_model

    family, _, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(family.cpt)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(family.cpt))
    rows = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 3]] * 4, "seq_lengths": [[5]] * 4})
    drift = InstructionDriftCallback(["Hi?"], ["upper"], residual=tmp_path / "missing", max_new_tokens=2)
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=1, use_cpu=True, report_to="none", remove_unused_columns=False,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer,
        data_collator=packing_collator(tokenizer), callbacks=[drift],
    )  # fmt: skip
    trainer.evaluate()
    logged = [e for e in trainer.state.log_history if "drift/raw/all" in e]
    assert len(logged) == 1 and not any(k.startswith("drift/ported") for k in logged[0])
