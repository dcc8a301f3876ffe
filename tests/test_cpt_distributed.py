"""Continual pre-training across real processes: `accelerate launch` with 2 CPU processes (gloo).

- FSDP2: 2 processes shard a tiny Llama with torch's ``fully_shard``, train a step and save it with
  accelerate's ``save_fsdp_model`` (SHARDED_STATE_DICT, the Trainer's own code path: DCP ``.distcp``
  files, no config, no safetensors), then run ``ResidualPortCallback.on_save`` on both ranks. The
  ported folder equals, bit for bit, a port of the same checkpoint consolidated by torch's
  ``dcp_to_torch_save``. (The Trainer itself cannot run FSDP on CPU: accelerate only turns FSDP on for
  GPU-like devices, a ``use_cpu`` run becomes MULTI_CPU data parallel.)
- DDP: ``run_cpt`` under 2 processes with a deliberately slow background port (10 s) on the first
  checkpoint: no rank's next step waits for it, ``save_total_limit`` ported folders are kept, drift is
  logged once per checkpoint under its step, and the kept ported folder equals a single-process port.
- Resume: checkpoints already ported are not ported again; an interrupted port is redone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import bits, load_tensors
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.cli import main
from hf_residual.core import sharded
from hf_residual.errors import InputNotFoundError

NEWS = [
    "The council of Quellport voted on Monday to build a new bridge over the river Amsel.",
    "Storms closed the harbour for two days; fishermen said prices at the market doubled.",
    "The school board approved a budget with more teachers and a smaller tax rise.",
    "A quick brown fox was seen near the town hall, to the delight of the children.",
]
SLOW_PORT_SECONDS = 10

FSDP_SCRIPT = r"""
import json, sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import save_fsdp_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

from hf_residual.cpt.callbacks import ResidualPortCallback

model_path, residual, run = sys.argv[1], sys.argv[2], Path(sys.argv[3])
state = PartialState(cpu=True)
mesh = init_device_mesh("cpu", (state.num_processes,))
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_path)
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]]) + state.process_index
model(input_ids=ids, labels=ids).loss.backward()  # one FSDP2 training step: the weights change
optimizer.step()

args = TrainingArguments(str(run), use_cpu=True, report_to="none", save_total_limit=2)
trainer_state, control = TrainerState(), TrainerControl()
trainer_state.is_world_process_zero = state.is_main_process
callback = ResidualPortCallback(residual)
callback.on_train_begin(args, trainer_state, control)  # a fresh run: step 0
trainer_state.global_step = 1
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
save_fsdp_model(plugin, state, model, str(run / "checkpoint-1"))  # what Trainer._save_checkpoint runs
callback.on_save(args, trainer_state, control, model=model, processing_class=tokenizer)
if state.is_main_process:
    callback.finish()
    (run / "outcome.json").write_text(
        json.dumps({"ported": [str(p) for p in callback.ported], "failures": callback.failures})
    )
state.wait_for_everyone()
"""

DDP_SCRIPT = r"""
import json, sys, time
from pathlib import Path

from transformers import TrainerCallback

from hf_residual.cpt.train import run_cpt


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.times.setdefault(state.global_step + 1, {})["begin"] = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step]["end"] = time.time()

    def on_save(self, args, state, control, **kwargs):
        self.times[state.global_step]["saved"] = time.time()


config, out = sys.argv[1], Path(sys.argv[2])
timer = StepTimes()
result = run_cpt(config, callbacks=[timer])
rank = int(__import__("os").environ["RANK"])
(out / f"times-{rank}.json").write_text(json.dumps(timer.times))
if rank == 0:
    (out / "result.json").write_text(json.dumps({
        "global_step": result.global_step,
        "ported": [str(p) for p in result.ported],
        "failures": result.port_failures,
        "log_history": result.log_history,
        "port_overhead": result.port_overhead,
    }))
"""

# Loaded by every Python process started with it on PYTHONPATH; only background ports (which carry
# HF_RESIDUAL_BACKGROUND_JOB) of the first checkpoint sleep, making that port deliberately slow.
SLOW_SITECUSTOMIZE = f"""
import os, time
if os.environ.get("HF_RESIDUAL_BACKGROUND_JOB") == "2":
    time.sleep({SLOW_PORT_SECONDS})
"""


@pytest.fixture(scope="module")
def setup(families, tmp_path_factory):
    family = families("llama", "float32")
    root = tmp_path_factory.mktemp("cpt-distributed")
    Dataset.from_dict({"text": NEWS * 6}).save_to_disk(root / "corpus")
    residual = api.extract(family.instruct, family.base, root / "residual", dtype="float32", progress=False)
    return family, root, residual.output


def _launch(script: Path, *args, env_extra: dict | None = None, timeout: int = 600):
    """``accelerate launch`` of 2 CPU processes (gloo): ``--multi_gpu`` picks the torchrun launcher,
    which is what starts several processes; the processes then run on CPU (``use_cpu``/``cpu=True``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        "0", str(script), *map(str, args),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _port_reference(residual: Path, folder: Path, output: Path) -> dict[str, torch.Tensor]:
    api.port(residual, folder, output, progress=False)
    return load_tensors(output)


def _assert_same_bits(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(bits(got[name]), bits(tensor)), name


def test_fsdp2_sharded_checkpoint_is_ported_in_the_background(setup, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    family, _, residual = setup
    run = tmp_path / "run"
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    _launch(script, family.cpt, residual, run)

    checkpoint = run / "checkpoint-1"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip
    assert not list(checkpoint.glob("*.safetensors")) and sharded.kind(checkpoint) == "dcp"
    outcome = json.loads((run / "outcome.json").read_text())
    assert outcome == {"ported": [str(run / "ported-checkpoint-1")], "failures": []}
    ported = run / "ported-checkpoint-1"
    assert (ported / "config.json").is_file() and (ported / "tokenizer_config.json").is_file()
    assert not list(run.glob(".ported-queue/*")) and not list(run.glob(".*consolidated*"))
    assert "wrote" in (run / "ported-logs" / "port-1.log").read_text()
    assert (
        "# checkpoint-1 + instruction residual" in (ported / "README.md").read_text()
    )  # named as the checkpoint

    # the reference: torch's own converter in this single process, then an ordinary port
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt")["model"]
    single = tmp_path / "single"
    single.mkdir()
    save_file(state, single / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (single / name).write_bytes((family.cpt / name).read_bytes())
    trained = load_tensors(single)
    start = load_tensors(family.cpt)
    assert not torch.equal(trained["model.norm.weight"], start["model.norm.weight"])  # FSDP2 trained it
    expected = _port_reference(residual, single, tmp_path / "expected")
    _assert_same_bits(load_tensors(ported), expected)

    # the consolidation in small batches (several safetensors shards) holds the trained tensors, and is
    # removed afterwards
    with sharded.consolidate(checkpoint, config_from=family.cpt, batch_bytes=20_000) as folder:
        assert len(list(folder.glob("model-*.safetensors"))) > 1
        _assert_same_bits(load_tensors(folder), trained)
    assert not folder.exists()

    # after training, from the command line: the sharded checkpoint folder is the target
    cli = tmp_path / "cli"
    assert main(["port", str(residual), "--to", str(checkpoint), "-o", str(cli / "port"), "--quiet"]) == 0
    assert main(["apply", str(residual), "--to", str(checkpoint), "-o", str(cli / "apply"), "--quiet"]) == 0
    _assert_same_bits(load_tensors(cli / "port"), expected)
    _assert_same_bits(load_tensors(cli / "apply"), expected)
    # the temporary consolidated folders were made beside the outputs and are gone
    assert sorted(p.name for p in cli.iterdir()) == ["apply", "port"] and not list(
        run.glob(".*consolidated*")
    )


def _write_config(family, root, residual, out: Path, **extra) -> Path:
    config = {
        "model": str(family.cpt),
        "corpus": str(root / "corpus"),
        "output_dir": str(out),
        "seq_len": 64,
        "batch_size": 1,
        "max_steps": 4,
        "save_steps": 2,
        "save_total_limit": 1,
        "logging_steps": 1,
        "schedule": {"type": "constant", "learning_rate": 1e-3},
        "residual_port": {"residual": str(residual)},
        "training_args": {"use_cpu": True, "disable_tqdm": True},
        **extra,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ddp_ports_in_background_rotate_and_log_drift_once(setup, tmp_path):
    family, root, residual = setup
    out = tmp_path / "run"
    config = _write_config(
        family, root, residual, out, eval_steps=2,
        instruction_drift={"residual": str(residual), "prompts": ["Hi?"], "checks": ["upper", "json"],
                           "max_new_tokens": 3},
    )  # fmt: skip
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))
    out.mkdir()
    _launch(script, config, out, env_extra={"PYTHONPATH": pythonpath})

    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == 4 and result["failures"] == []
    # every checkpoint was ported once; save_total_limit 1 keeps the newest one, like the checkpoints
    assert [Path(p).name for p in result["ported"]] == [f"ported-checkpoint-{s}" for s in (2, 4)]
    assert sorted(p.name for p in out.glob("ported-checkpoint-*")) == ["ported-checkpoint-4"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not list((out / ".ported-queue").iterdir())

    # the kept ported folder equals a port of the same checkpoint in this single process
    _assert_same_bits(
        load_tensors(out / "ported-checkpoint-4"),
        _port_reference(residual, out / "checkpoint-4", tmp_path / "ref"),
    )

    # drift: once per checkpoint, under its step, with both the raw and the ported scores
    drift = [e for e in result["log_history"] if any(k.startswith("drift/") for k in e)]
    assert [e["step"] for e in drift] == [2, 4]
    assert all(
        {"drift/raw/all", "drift/raw/upper", "drift/ported/all", "drift/ported/json"} <= e.keys()
        for e in drift
    )
    assert sum("eval_loss" in e for e in result["log_history"]) == 2

    # no rank waited on the slow port of checkpoint-2: step 3 ended on both ranks long before that port
    # (which slept 10 s) finished, and took far less than the sleep
    port = json.loads((out / "ported-logs" / "port-2.result.json").read_text())
    assert port["finished"] - port["started"] >= SLOW_PORT_SECONDS
    for rank in (0, 1):
        times = {int(k): v for k, v in json.loads((out / f"times-{rank}.json").read_text()).items()}
        step3 = times[3]["end"] - times[3]["begin"]
        save = times[2]["saved"] - times[2]["end"]
        assert step3 < SLOW_PORT_SECONDS / 2, (rank, step3, save)
        assert times[3]["end"] < port["finished"] - SLOW_PORT_SECONDS / 2, (rank, times[3], port)


def test_resume_does_not_port_twice_and_redoes_an_interrupted_port(setup, tmp_path):
    from hf_residual.cpt.train import run_cpt

    family, root, residual = setup
    out = tmp_path / "run"
    out.mkdir()
    config = _write_config(family, root, residual, out, max_steps=4, save_total_limit=None)
    first = run_cpt(config)
    assert [p.name for p in first.ported] == ["ported-checkpoint-2", "ported-checkpoint-4"]
    # an interrupted port of checkpoint-4: its staging folder was left, the final folder never appeared,
    # and no result was written (the result file is removed when a port starts)
    (out / "ported-logs" / "port-4.result.json").unlink()
    (out / ".checkpoint-4.consolidated-x1").mkdir()
    os.rename(out / "ported-checkpoint-4", out / ".ported-checkpoint-4.partial-deadbeef")

    settings = yaml.safe_load(config.read_text())
    settings["residual_port"]["keep_ported"] = 2  # overrides save_total_limit (None: keep all)
    second = run_cpt(settings | {"max_steps": 6, "resume_from_checkpoint": True})
    assert second.global_step == 6 and second.port_failures == []
    assert [p.name for p in second.ported] == ["ported-checkpoint-4", "ported-checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert sorted(p.name for p in out.glob("ported-checkpoint-*")) == [
        "ported-checkpoint-4",
        "ported-checkpoint-6",
    ]
    assert (out / "ported-logs" / "port-2.log").read_text().count("$ ") == 1  # ported once, in the first run
    assert (out / "ported-logs" / "port-4.log").read_text().count("$ ") == 2  # redone after the interruption
    assert not list(out.glob(".ported-checkpoint-*.partial-*")) and not list(out.glob(".checkpoint-*"))
    _assert_same_bits(
        load_tensors(out / "ported-checkpoint-4"),
        _port_reference(residual, out / "checkpoint-4", tmp_path / "ref"),
    )
    # ported-checkpoint-2 was rotated away, checkpoint-2 is still there: resuming again leaves it alone
    third = run_cpt(settings | {"max_steps": 8, "resume_from_checkpoint": True})
    assert [p.name for p in third.ported] == ["ported-checkpoint-8"] and third.port_failures == []
    assert (out / "ported-logs" / "port-2.log").read_text().count("$ ") == 1


def test_consolidated_tied_model_without_config_ports_like_the_original(families, tmp_path):
    """A DCP checkpoint of a model with tied embeddings, without config.json (as the Trainer leaves
    it): the config comes from the run folder above, the tied duplicate is left out like
    save_pretrained does, and the port equals the port of the original folder bit for bit."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    family = families("qwen2", "float32")  # tied word embeddings
    residual = api.extract(family.instruct, family.base, tmp_path / "residual", progress=False).output
    model = AutoModelForCausalLM.from_pretrained(family.cpt)
    assert model.config.tie_word_embeddings
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-3"
    shards = checkpoint / "pytorch_model_fsdp_0"
    dcp.save({"model": model.state_dict()}, checkpoint_id=shards, no_dist=True)
    assert "model.lm_head.weight" in dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    shutil.copytree(checkpoint, tmp_path / "elsewhere" / checkpoint.name)
    model.config.save_pretrained(run)

    with sharded.consolidate(checkpoint) as folder:
        assert load_tensors(folder).keys() == load_tensors(family.cpt).keys()  # no lm_head.weight
        ported = _port_reference(residual, folder, tmp_path / "ported")
    _assert_same_bits(ported, _port_reference(residual, family.cpt, tmp_path / "expected"))
    assert not list(run.glob(".*"))
    with (
        pytest.raises(InputNotFoundError, match="no config.json"),
        sharded.consolidate(tmp_path / "elsewhere" / checkpoint.name),
    ):
        pass


def test_drift_only_callback_in_a_plain_trainer_logs_under_each_checkpoint_step(setup, tmp_path):
    """``ResidualPortCallback(drift=..., write_ported=False)`` in a user's own Trainer: every checkpoint is
    scored in the background, nothing is kept, ``on_train_end`` waits for the last one, and each score
    reaches the logging callbacks once, with the state's step set to its checkpoint's step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from hf_residual.cpt.callbacks import ResidualPortCallback
    from hf_residual.cpt.packing import packing_collator, prepare_model

    family, _, residual = setup

    class Recorder(TrainerCallback):
        logged: list[tuple[int, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append((state.global_step, dict(logs or {})))

    tokenizer = AutoTokenizer.from_pretrained(family.cpt)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(family.cpt))
    rows = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 3]] * 4, "seq_lengths": [[5]] * 4})
    drift = {"prompts": ["Hi?"], "checks": ["upper"], "max_new_tokens": 2}
    port = ResidualPortCallback(residual, drift=drift, write_ported=False)
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=2, save_steps=1, use_cpu=True, report_to="none",
        remove_unused_columns=False, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    recorder = Recorder()
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=packing_collator(tokenizer), callbacks=[port, recorder],
    )  # fmt: skip
    port.attach(trainer)
    trainer.train()
    assert port.failures == [] and port.ported == []
    assert not list((tmp_path / "run").glob("ported-checkpoint-*"))
    scored = [(step, logs) for step, logs in recorder.logged if "drift/raw/all" in logs]
    assert [step for step, _ in scored] == [1, 2]
    assert all(
        {"drift/raw/upper", "drift/ported/all", "drift/ported/upper"} <= logs.keys() for _, logs in scored
    )
    history = [e["step"] for e in trainer.state.log_history if "drift/ported/all" in e]
    assert history == [1, 2]


def test_documented_slurm_launch_parses_with_accelerate():
    """The SLURM example of docs/CPT.md is a command accelerate's own parser accepts, for hf-residual cpt."""
    import re
    import shlex

    from accelerate.commands.launch import launch_command_parser

    text = (Path(__file__).parents[1] / "docs" / "CPT.md").read_text()
    script = next(b.split("```", 1)[0] for b in text.split("```bash\n")[1:] if "#SBATCH" in b)
    inner = re.search(r"srun bash -c '(.*?)'", script, re.S).group(1).replace("\\\n", " ")
    values = {"$SLURM_NNODES": "4", "$((SLURM_NNODES * 8))": "32", "$SLURM_NODEID": "1",
              "$MASTER_ADDR": "node1", "$MASTER_PORT": "29500"}  # fmt: skip
    for name, value in values.items():
        inner = inner.replace(name, value)
    words = shlex.split(inner)
    assert words[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(words[2:])
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 1)
    assert args.module and args.training_script == "hf_residual.cli" and args.training_script_args[0] == "cpt"


def test_background_ports_push_one_commit_per_checkpoint(setup, hub, monkeypatch, tmp_path):
    """``push_to``: the background process pushes each ported checkpoint (the token and the Hub endpoint
    reach it through the environment), one commit per checkpoint, while the local folders stay."""
    import uuid

    from hubserver import add_family
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_residual.cpt.callbacks import ResidualPortCallback
    from hf_residual.cpt.packing import packing_collator, prepare_model

    family, _, _ = setup
    hub.add_token("hf_cptWriterToken", "tester", {"org"})
    monkeypatch.setenv("HF_TOKEN", "hf_cptWriterToken")
    ids = add_family(hub, family, f"org/m{uuid.uuid4().hex[:8]}")  # the instruct model, from the Hub
    repo = f"org/cpt-instruct-{uuid.uuid4().hex[:6]}"
    tokenizer = AutoTokenizer.from_pretrained(family.cpt)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(family.cpt))
    rows = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 3]] * 4, "seq_lengths": [[5]] * 4})
    port = ResidualPortCallback(ids["instruct"], push_to=repo)
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=2, save_steps=1, use_cpu=True, report_to="none",
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=packing_collator(tokenizer), callbacks=[port],
    )  # fmt: skip
    trainer.train()
    assert port.failures == [] and [p.name for p in port.ported] == [
        "ported-checkpoint-1",
        "ported-checkpoint-2",
    ]
    log = subprocess.run(
        ["git", "-C", str(hub.repo_path(repo)), "log", "--format=%s", "main"], capture_output=True, text=True
    )
    titles = log.stdout.splitlines()
    assert titles[:2] == ["ported checkpoint at step 2", "ported checkpoint at step 1"], titles
    assert hub.head(ids["instruct"]) in (tmp_path / "run" / "ported-checkpoint-2" / "README.md").read_text()
