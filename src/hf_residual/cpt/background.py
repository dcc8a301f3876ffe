"""Ports (and drift scores) of saved checkpoints in a separate process, so training never waits on them.

``BackgroundPorter`` (in the training's main process) keeps a queue of ``PortJob``s and one worker thread
that runs them one at a time, each as ``python -m hf_residual.cpt.background JOB.json``: a fresh process
with no process group (the distributed environment variables are removed), its own log file, a lower
CPU priority, and a ``.result.json`` it writes at the end. The thread only waits on the child, so the
training loop is not slowed beyond the cost of queueing. The child consolidates a sharded checkpoint
(``core.sharded``), ports it with ``hf_residual.ops.port`` (which also pushes), scores instruction drift
of the checkpoint and of its ported version when asked, and removes its snapshot of the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

JOB_ENV = "HF_RESIDUAL_BACKGROUND_JOB"  # set (to the step) in every background process's environment
# the launcher's variables: a child that saw them would try to join the training's process group
_DISTRIBUTED_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
)
_DISTRIBUTED_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "TORCH_NCCL_", "NCCL_")


@dataclass
class PortJob:
    """One checkpoint to port. ``checkpoint``: the folder read (a hard-linked snapshot when ``snapshot``);
    ``output`` None ports to a temporary folder (drift only). ``drift``: prompts/checks/max_new_tokens/
    device, or None. ``log``/``result``: where the child writes its log and its outcome."""

    step: int
    checkpoint: str
    output: str | None
    residual: str
    log: str
    result: str
    alpha: float = 1.0
    base: str | None = None
    force: bool = False
    push_to: str | None = None
    drift: dict | None = None
    snapshot: bool = False
    config_from: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> PortJob:
        return cls(**json.loads(Path(path).read_text()))


def child_environment(step: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DISTRIBUTED_ENV and not key.startswith(_DISTRIBUTED_PREFIXES)
    }
    env[JOB_ENV] = str(step)
    return env


def snapshot(checkpoint: Path, into: Path) -> Path:
    """Hard-link the model files of ``checkpoint`` into ``into`` (optimizer and RNG states left out), so
    the Trainer's rotation may delete the checkpoint while the port still reads it. Raises OSError where
    the filesystem cannot link (the caller then reads the checkpoint in place)."""
    if into.exists():
        shutil.rmtree(into)
    into.parent.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(
        "optimizer*", "*optim_states.pt", "rng_state*", "scheduler.pt", "scaler.pt", "training_args.bin"
    )
    try:
        shutil.copytree(checkpoint, into, copy_function=os.link, ignore=ignore)
    except (OSError, shutil.Error):
        shutil.rmtree(into, ignore_errors=True)
        raise OSError(f"cannot hard-link {checkpoint} into {into}") from None
    return into


class BackgroundPorter:
    """A queue of port jobs run one at a time in child processes; results are collected by the caller.

    ``on_finished(result)`` is called in the worker thread after each job (used for rotation).
    ``collect()`` returns the results finished since the last call; ``wait()`` blocks until the queue is empty.
    """

    def __init__(self, on_finished=None):
        self.on_finished = on_finished
        self._queue: queue.Queue[PortJob | None] = queue.Queue()
        self._done: list[dict] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.running: PortJob | None = None

    def submit(self, job: PortJob) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="hf-residual-ports", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def pending(self) -> int:
        """Jobs queued or running."""
        return self._queue.unfinished_tasks

    def collect(self) -> list[dict]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> None:
        self._queue.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self.running = job
                try:
                    result = run_child(job)
                except Exception as error:  # e.g. the log folder cannot be written: a failed port
                    result = {"step": job.step, "ok": False, "error": f"{type(error).__name__}: {error}"}
                if self.on_finished is not None:
                    try:
                        self.on_finished(result)
                    except Exception as error:  # rotation trouble must not lose the result
                        logger.error("after the port of step %s: %s", job.step, error)
                with self._lock:
                    self._done.append(result)
            finally:
                self.running = None
                self._queue.task_done()


def run_child(job: PortJob) -> dict:
    """Run one job in a child process and return its result (a failure is a result, never raised)."""
    log, result_path = Path(job.log), Path(job.result)
    log.parent.mkdir(parents=True, exist_ok=True)
    job_path = result_path.with_name(result_path.name.replace(".result.json", ".job.json"))
    job.write(job_path)
    result_path.unlink(missing_ok=True)
    started = time.time()
    command = [sys.executable, "-m", "hf_residual.cpt.background", str(job_path)]
    try:
        with open(log, "a") as stream:
            stream.write(f"$ {' '.join(command)}\n")
            stream.flush()
            code = subprocess.call(
                command, stdout=stream, stderr=subprocess.STDOUT, env=child_environment(job.step)
            )
    except OSError as error:
        code, failure = -1, f"could not start the background port: {error}"
    else:
        failure = f"the background port exited with code {code}; see {log}"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"step": job.step, "ok": False, "error": failure}
    result.setdefault("step", job.step)
    # the child's own clock starts after its imports; these are the parent's, around the whole process
    result["child_started"], result["child_finished"] = result.get("started"), result.get("finished")
    result["started"], result["finished"] = started, time.time()
    result["seconds"] = round(result["finished"] - started, 3)
    result["log"] = str(log)
    result_path.write_text(json.dumps(result, indent=2) + "\n")  # the parent's view, for who follows the logs
    if job.snapshot:
        shutil.rmtree(job.checkpoint, ignore_errors=True)
    return result


# ---- the child ---------------------------------------------------------------------------------------


def _score_folder(folder: Path, drift: dict) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_residual.cpt import checks as checks_module

    checks = checks_module.resolve_checks(drift.get("checks"))
    prompts = list(drift.get("prompts") or checks_module.DEFAULT_PROMPTS)
    device = torch.device(drift.get("device") or "cpu")
    model = AutoModelForCausalLM.from_pretrained(folder).to(device)
    replies = checks_module.generate_replies(
        model, AutoTokenizer.from_pretrained(folder), prompts, checks, drift.get("max_new_tokens", 24)
    )
    return checks_module.score(replies, checks)


def execute(job: PortJob) -> dict:
    """Port (and score) one checkpoint in this process; what ``python -m`` runs in the child."""
    from hf_residual.core import sharded
    from hf_residual.ops.port import port

    checkpoint = Path(job.checkpoint)
    message = f"ported checkpoint at step {job.step}"
    result: dict = {"step": job.step, "ok": True, "output": job.output}
    parent = Path(job.output).parent if job.output else Path(job.result).parent
    with tempfile.TemporaryDirectory(prefix=f".port-{job.step}-", dir=parent) as tmp:
        scratch = Path(tmp)
        output = Path(job.output) if job.output else scratch / "ported"
        workdir = output.parent if job.output else scratch
        with sharded.consolidate(checkpoint, workdir=workdir, config_from=job.config_from) as target:
            result["sharded"] = target != checkpoint
            logger.info("porting %s to %s (step %s)", checkpoint, output, job.step)
            port(
                job.residual,
                target,
                output,
                base=job.base,
                alpha=job.alpha,
                overwrite=True,
                force=job.force,
                progress=False,
                push_to=job.push_to,
                commit_message=message if job.push_to else None,
            )
            logger.info("wrote %s", output)
            if job.drift is not None:
                result["drift"] = {"raw": _score_folder(Path(target), job.drift)}
                result["drift"]["ported"] = _score_folder(output, job.drift)
                logger.info("drift at step %s: %s", job.step, result["drift"])
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(10)  # the training processes come first
    job_path = Path(argv[0])
    job = PortJob.read(job_path)
    started = time.time()
    try:
        result = execute(job)
    except Exception as error:  # reported to the trainer through the result file
        logger.exception("the port of step %s failed", job.step)
        result = {"step": job.step, "ok": False, "error": f"{type(error).__name__}: {error}"}
    result["started"], result["finished"] = started, time.time()
    result_path = Path(job.result)
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
