"""Trainer callbacks that keep an instruction-following version of every checkpoint in sight.

``ResidualPortCallback``: at each checkpoint save, ``checkpoint + alpha * residual`` is written beside it
(``ported-checkpoint-<step>``) with the core engine, and optionally pushed. ``InstructionDriftCallback``:
at each evaluation, the share of verifiable instructions followed by the raw model and by its ported
version, logged through the Trainer (TensorBoard, W&B, ...): the paper's Figure 1, live.
Both work from the main process only; a failure to port is logged and never stops training.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from hf_residual.cpt import checks as checks_module

logger = logging.getLogger(__name__)

PORTED_PREFIX = "ported-"  # not "checkpoint-*": the Trainer's checkpoint rotation must not touch it


def ported_path(checkpoint: Path) -> Path:
    """Where the ported version of ``checkpoint`` is written: beside it, outside the Trainer's naming."""
    return checkpoint.parent / f"{PORTED_PREFIX}{checkpoint.name}"


def _port(residual, target: Path, output: Path, alpha: float, base, force: bool, push_to, step) -> Path:
    from hf_residual import api

    message = f"ported checkpoint at step {step}" if step is not None else None
    result = api.port(
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


class ResidualPortCallback(TrainerCallback):
    """On every save, write ``checkpoint + alpha * residual`` beside the checkpoint (and push it).

    ``residual``: a residual folder or repo, or an instruct model (then ``base`` or its card names the
    base). ``push_to``: a Hub repo receiving one commit per checkpoint. Runs on the main process only;
    errors are logged and kept in ``failures``, never raised, so training goes on.
    """

    def __init__(
        self,
        residual: str | Path,
        alpha: float = 1.0,
        push_to: str | None = None,
        *,
        base: str | Path | None = None,
        force: bool = False,
    ):
        self.residual, self.alpha, self.push_to, self.base, self.force = residual, alpha, push_to, base, force
        self.ported: list[Path] = []
        self.failures: list[tuple[int, str]] = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            output = _port(
                self.residual,
                checkpoint,
                ported_path(checkpoint),
                self.alpha,
                self.base,
                self.force,
                self.push_to,
                state.global_step,
            )
        except Exception as error:  # a failed port must not kill a long training run
            logger.error("porting the residual to %s failed: %s", checkpoint, error)
            self.failures.append((state.global_step, f"{type(error).__name__}: {error}"))
            return
        logger.info("wrote the ported checkpoint %s", output)
        self.ported.append(output)


def _prompt_ids(tokenizer, prompt: str, instruction: str):
    content = f"{prompt} {instruction}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return tokenizer(content + "\n", return_tensors="pt")


def generate_replies(model, tokenizer, prompts: list[str], checks, max_new_tokens: int) -> dict:
    """Greedy replies to every (prompt, check) pair, one at a time (no padding questions)."""
    import torch

    was_training = model.training
    model.eval()
    replies = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for prompt in prompts:
                for check in checks:
                    inputs = _prompt_ids(tokenizer, prompt, check.instruction).to(model.device)
                    out = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=pad,
                    )
                    new = out[0, inputs["input_ids"].shape[1] :]
                    replies[(prompt, check.name)] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return replies


class InstructionDriftCallback(TrainerCallback):
    """On every evaluation, score verifiable instruction following of the raw and of the ported model.

    ``prompts``: short questions; ``checks``: names from ``hf_residual.cpt.checks.CHECKS`` (all when
    None). Each prompt is asked with each check's instruction; the share followed is logged as
    ``drift/raw/<check>`` and ``drift/ported/<check>`` (``all`` for the mean). The ported model is built
    with the core engine from the in-memory weights saved to a temporary folder, so it costs one save and
    one port per evaluation. ``attach(trainer)`` (done by ``run_cpt``) sends the figures through
    ``Trainer.log``; without it they are appended to ``state.log_history``. Single process or DDP: under
    FSDP the weights are sharded, so use ``ResidualPortCallback`` and evaluate the ported folders.
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

    def attach(self, trainer) -> InstructionDriftCallback:
        self.trainer = trainer
        return self

    def _score(self, model, tokenizer) -> dict[str, float]:
        replies = generate_replies(model, tokenizer, self.prompts, self.checks, self.max_new_tokens)
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
