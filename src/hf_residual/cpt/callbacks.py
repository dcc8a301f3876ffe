"""Trainer callbacks that keep an instruction-following version of every checkpoint in sight.

``ResidualPortCallback``: at each checkpoint save, ``checkpoint + alpha * residual`` is written beside it
(``ported-checkpoint-<step>``) by a background process (``cpt.background``), optionally pushed, and
optionally scored for instruction drift; sharded checkpoints (FSDP ``SHARDED_STATE_DICT``, DeepSpeed ZeRO)
are consolidated there first (``core.sharded``). Training never waits on a port: the callback only queues
it. ``InstructionDriftCallback``: at each evaluation of a single-process run, the share of verifiable
instructions followed by the raw model and by its ported version, logged through the Trainer
(TensorBoard, W&B, ...): the paper's Figure 1, live. A failed port is logged and never stops training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_residual.cpt import checks as checks_module

logger = logging.getLogger(__name__)

PORTED_PREFIX = "ported-"  # not "checkpoint-*": the Trainer's checkpoint rotation must not touch it
LOG_FOLDER = "ported-logs"  # one log, job and result file per background port
QUEUE_FOLDER = ".ported-queue"  # hard-linked snapshots of the checkpoints waiting for their port
_STEP = re.compile(r"^(?:ported-)?checkpoint-(\d+)$")


def ported_path(checkpoint: Path) -> Path:
    """Where the ported version of ``checkpoint`` is written: beside it, outside the Trainer's naming."""
    return checkpoint.parent / f"{PORTED_PREFIX}{checkpoint.name}"


def _step_of(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def _port(residual, target: Path, output: Path, alpha: float, base, force: bool, push_to, step) -> Path:
    from hf_residual.ops.port import port

    message = f"ported checkpoint at step {step}" if step is not None else None
    result = port(
        residual,
        target,
        output,
        base=base,
        alpha=alpha,
        overwrite=True,
        force=force,
        progress=False,
        push_to=push_to,
        commit_message=message,
    )
    return result.output


def _barrier() -> None:
    """All ranks have finished writing the checkpoint (the Trainer's save has no barrier of its own)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rotate_ported(output_dir: Path, limit: int | None) -> list[Path]:
    """Delete all but the newest ``limit`` ``ported-checkpoint-*`` folders; returns the ones deleted."""
    if limit is None:
        return []
    folders = sorted(
        (
            p
            for p in output_dir.glob(f"{PORTED_PREFIX}checkpoint-*")
            if p.is_dir() and _step_of(p) is not None
        ),
        key=_step_of,
    )
    doomed = folders[: max(len(folders) - limit, 0)]
    for folder in doomed:
        logger.info("deleting %s (keeping the newest %d ported checkpoints)", folder, limit)
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


class ResidualPortCallback(TrainerCallback):
    """On every save, write ``checkpoint + alpha * residual`` beside the checkpoint (and push it).

    ``residual``: a residual folder or repo, or an instruct model (then ``base`` or its card names the
    base). ``push_to``: a Hub repo receiving one commit per checkpoint. The port runs in a background
    process started by the main process once every rank has passed the save (one at a time, the next
    ones queued; log in ``<output_dir>/ported-logs/``); training goes on meanwhile. ``keep_ported``: how
    many ``ported-checkpoint-*`` to keep (default: ``save_total_limit``; None for both keeps all).
    ``drift``: also score instruction drift of each checkpoint and its ported version in that process
    (keys ``prompts``, ``checks``, ``max_new_tokens``, ``device``), logged under the checkpoint's step.
    ``write_ported=False`` ports to a temporary folder (drift only). ``wait_on_train_end``: the main
    process waits for the last port at the end of training (``finish`` does it later otherwise). Errors
    are logged and kept in ``failures``, never raised. On resume, checkpoints already ported are not
    ported again; one whose port was interrupted is.
    """

    def __init__(
        self,
        residual: str | Path,
        alpha: float = 1.0,
        push_to: str | None = None,
        *,
        base: str | Path | None = None,
        force: bool = False,
        keep_ported: int | None = None,
        drift: dict | None = None,
        write_ported: bool = True,
        wait_on_train_end: bool = True,
    ):
        self.residual, self.alpha, self.push_to, self.base, self.force = residual, alpha, push_to, base, force
        self.keep_ported, self.write_ported, self.wait_on_train_end = (
            keep_ported,
            write_ported,
            wait_on_train_end,
        )
        if drift is not None:
            checks_module.resolve_checks(drift.get("checks"))  # unknown names fail now, not in the child
        self.drift = drift
        self.ported: list[Path] = []
        self.failures: list[tuple[int, str]] = []
        self.history: list[dict[str, float]] = []
        self.queued: list[int] = []
        self.trainer = None
        self.overhead: list[tuple[int, float]] = []  # (step, seconds this callback's on_save took)
        self._porter = None
        self._limit: int | None = None
        self._output_dir: Path | None = None
        self._args = self._state = None

    def attach(self, trainer) -> ResidualPortCallback:
        self.trainer = trainer
        return self

    # ---- queueing (main process) --------------------------------------------------------------------

    def _porter_for(self, output_dir: Path):
        from hf_residual.cpt.background import BackgroundPorter

        if self._porter is None:
            self._porter = BackgroundPorter(on_finished=self._after_port)
        self._output_dir = output_dir
        return self._porter

    def _after_port(self, result: dict) -> None:  # in the worker thread, after each port
        if result.get("ok") and self.write_ported and self._output_dir is not None:
            rotate_ported(self._output_dir, self._limit)

    def _enqueue(self, checkpoint: Path, step: int) -> None:
        from hf_residual.cpt.background import PortJob, snapshot

        if step in self.queued:  # already queued by this run (resume, then a save of the same step)
            return
        output_dir = checkpoint.parent
        logs = output_dir / LOG_FOLDER
        try:
            source, linked = snapshot(checkpoint, output_dir / QUEUE_FOLDER / checkpoint.name), True
        except OSError as error:  # no hard links here: read in place (the rotation may race with it)
            logger.warning("%s; the port reads %s in place", error, checkpoint)
            source, linked = checkpoint, False
        job = PortJob(
            step=step,
            checkpoint=str(source),
            output=str(ported_path(checkpoint)) if self.write_ported else None,
            residual=str(self.residual),
            log=str(logs / f"port-{step}.log"),
            result=str(logs / f"port-{step}.result.json"),
            alpha=self.alpha,
            base=str(self.base) if self.base is not None else None,
            force=self.force,
            push_to=self.push_to,
            drift=dict(self.drift) if self.drift is not None else None,
            snapshot=linked,
            config_from=str(output_dir) if (output_dir / "config.json").is_file() else None,
        )
        self._porter_for(output_dir).submit(job)
        self.queued.append(step)
        logger.info("queued the port of %s (log: %s)", checkpoint, job.log)

    def _done(self, output_dir: Path, checkpoint: Path) -> bool:
        """Ported by an earlier run: its result says so (its folder may since have been rotated away),
        or the folder is there. A port that was interrupted left neither (its result file is removed
        when it starts, and the engine renames the folder into place only when it is complete)."""
        import json

        if self.write_ported and ported_path(checkpoint).is_dir():
            return True
        result = output_dir / LOG_FOLDER / f"port-{_step_of(checkpoint)}.result.json"
        try:
            return bool(json.loads(result.read_text()).get("ok", False))
        except (OSError, ValueError):
            return False

    def _resume(self, output_dir: Path) -> None:
        """Port the checkpoints of an earlier run whose port never finished (the rest are left alone)."""
        shutil.rmtree(output_dir / QUEUE_FOLDER, ignore_errors=True)
        leftovers = [  # an interrupted port's staging, scratch and consolidation folders
            *output_dir.glob(f".{PORTED_PREFIX}checkpoint-*.partial-*"),
            *output_dir.glob(".port-*"),
            *(output_dir / LOG_FOLDER).glob(".port-*"),
            *output_dir.glob(".checkpoint-*.consolidated-*"),
        ]
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        checkpoints = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None),
            key=_step_of,
        )
        for checkpoint in checkpoints:
            if not self._done(output_dir, checkpoint):
                logger.info("%s was not ported (interrupted or never started): porting it now", checkpoint)
                self._enqueue(checkpoint, _step_of(checkpoint))

    # ---- Trainer events -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._args, self._state = args, state
        self._limit = self.keep_ported if self.keep_ported is not None else args.save_total_limit
        if state.is_world_process_zero and state.global_step > 0 and Path(args.output_dir).is_dir():
            self._resume(Path(args.output_dir))

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        started = time.perf_counter()
        _barrier()
        if state.is_world_process_zero:
            self._queue_save(args, state, control, model, processing_class)
        self.overhead.append((state.global_step, time.perf_counter() - started))

    def _queue_save(self, args, state, control, model, processing_class) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            logger.error("no checkpoint folder %s to port", checkpoint)
            self.failures.append((state.global_step, f"no checkpoint folder {checkpoint}"))
            return
        try:
            _complete_folder(checkpoint, model, processing_class)
            self._enqueue(checkpoint, state.global_step)
        except Exception as error:  # a failed port must not kill a long training run
            logger.error("queueing the port of %s failed: %s", checkpoint, error)
            self.failures.append((state.global_step, f"{type(error).__name__}: {error}"))
        self._drain(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        self._drain(args, state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        self._drain(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self.wait_on_train_end:
            self.wait(args, state, control)
        else:
            self._drain(args, state, control)

    def wait(self, args=None, state=None, control=None) -> None:
        """Block until every queued port has finished, then record and log their results."""
        args, state = args or self._args, state or self._state
        if self._porter is not None and self._porter.pending():
            running = self._porter.running
            message = f"waiting for {self._porter.pending()} background port(s) to finish" + (
                f" (step {running.step}; log: {running.log})" if running is not None else ""
            )
            logger.warning(message)
            print(f"hf-residual: {message}", flush=True)
            self._porter.wait()
        if state is not None:
            self._drain(args, state, control)

    def finish(self, trainer=None) -> None:
        """After training (and the final save): wait for the ports and log what they measured."""
        if trainer is not None:
            self.trainer = trainer
            self.wait(trainer.args, trainer.state, trainer.control)
        else:
            self.wait()

    # ---- results (main thread) ----------------------------------------------------------------------

    def _drain(self, args, state, control) -> None:
        if self._porter is None:
            return
        for result in self._porter.collect():
            step = result["step"]
            if not result.get("ok"):
                logger.error("porting the residual to checkpoint-%s failed: %s", step, result.get("error"))
                self.failures.append((step, result.get("error", "unknown error")))
                continue
            if result.get("output"):
                logger.info("wrote the ported checkpoint %s in %.1fs", result["output"], result["seconds"])
                self.ported.append(Path(result["output"]))
            if result.get("drift"):
                logs = {f"drift/raw/{k}": v for k, v in result["drift"]["raw"].items()}
                logs.update({f"drift/ported/{k}": v for k, v in result["drift"]["ported"].items()})
                self.history.append({"step": step, **logs})
                _log_at_step(self.trainer, args, state, control, logs, step)


def _log_at_step(trainer, args, state, control, logs: dict, step: int) -> None:
    """Log ``logs`` once, under ``step`` (not the current step): history, then every logging callback."""
    state.log_history.append({**logs, "step": step})
    if trainer is not None and args is not None:
        past = dataclasses.replace(state, global_step=step, log_history=[])
        trainer.callback_handler.on_log(args, past, control if control is not None else trainer.control, logs)


def _complete_folder(checkpoint: Path, model, processing_class) -> None:
    """A sharded checkpoint holds no config or tokenizer: write them so the folder can be ported later."""
    if model is not None and not (checkpoint / "config.json").is_file():
        model.config.save_pretrained(checkpoint)
        generation = getattr(model, "generation_config", None)
        if generation is not None and not (checkpoint / "generation_config.json").is_file():
            with contextlib.suppress(ValueError, OSError):  # a generation config transformers finds invalid
                generation.save_pretrained(checkpoint)
    if processing_class is not None and not (checkpoint / "tokenizer_config.json").is_file():
        processing_class.save_pretrained(checkpoint)


class InstructionDriftCallback(TrainerCallback):
    """On every evaluation, score verifiable instruction following of the raw and of the ported model.

    ``prompts``: short questions; ``checks``: names from ``hf_residual.cpt.checks.CHECKS`` (all when
    None). Each prompt is asked with each check's instruction; the share followed is logged as
    ``drift/raw/<check>`` and ``drift/ported/<check>`` (``all`` for the mean). The ported model is built
    with the core engine from the in-memory weights saved to a temporary folder, so it costs one save and
    one port per evaluation. ``attach(trainer)`` (done by ``run_cpt``) sends the figures through
    ``Trainer.log``; without it they are appended to ``state.log_history``. Single process only: under
    several processes it logs a warning and does nothing (rank 0 generating would hold up the other
    ranks, and FSDP shards the weights); ``ResidualPortCallback(drift=...)`` scores each checkpoint and its
    ported version in its background process instead, logged under the checkpoint's step.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        checks: list[str] | None = None,
        *,
        residual: str | Path | None = None,
        alpha: float = 1.0,
        base: str | Path | None = None,
        force: bool = False,
        max_new_tokens: int = 24,
    ):
        self.prompts = list(prompts or checks_module.DEFAULT_PROMPTS)
        self.checks = checks_module.resolve_checks(checks)
        self.residual, self.alpha, self.base, self.force = residual, alpha, base, force
        self.max_new_tokens = max_new_tokens
        self.trainer = None
        self.history: list[dict[str, float]] = []
        self._warned = False

    def attach(self, trainer) -> InstructionDriftCallback:
        self.trainer = trainer
        return self

    def _score(self, model, tokenizer) -> dict[str, float]:
        replies = checks_module.generate_replies(
            model, tokenizer, self.prompts, self.checks, self.max_new_tokens
        )
        return checks_module.score(replies, self.checks)

    def _score_ported(self, model, tokenizer, step: int) -> dict[str, float] | None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="hf-residual-drift-") as tmp:
            raw = Path(tmp) / "raw"
            model.save_pretrained(raw)
            tokenizer.save_pretrained(raw)
            try:
                ported = _port(
                    self.residual, raw, Path(tmp) / "ported", self.alpha, self.base, self.force, None, None
                )
            except Exception as error:  # scoring is advisory: log and go on training
                logger.error("porting for the drift evaluation at step %s failed: %s", step, error)
                return None
            ported_model = AutoModelForCausalLM.from_pretrained(ported, dtype=model.dtype).to(model.device)
            return self._score(ported_model, AutoTokenizer.from_pretrained(ported))

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        if args.world_size > 1:
            if not self._warned:
                logger.warning(
                    "InstructionDriftCallback scores in-process on single-process runs only (the other ranks "
                    "would wait on rank 0, and FSDP weights are sharded); under %d processes use "
                    "ResidualPortCallback(drift=...), which scores each checkpoint in its background process",
                    args.world_size,
                )
                self._warned = True
            return
        if not state.is_world_process_zero or model is None or processing_class is None:
            return
        logs = {f"drift/raw/{k}": v for k, v in self._score(model, processing_class).items()}
        if self.residual is not None:
            ported = self._score_ported(model, processing_class, state.global_step)
            logs.update({f"drift/ported/{k}": v for k, v in (ported or {}).items()})
        self.history.append({"step": state.global_step, **logs})
        if metrics is not None:
            metrics.update(logs)
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})
