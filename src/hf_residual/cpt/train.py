"""``run_cpt``: continual pre-training with the transformers Trainer on a packed corpus.

corpus (+ replay) -> tokenize -> pack (per-document attention) -> Trainer with the configured
re-warming/re-decaying schedule, checkpoints, Hub pushes and the residual callbacks. Multi-GPU runs go
through ``accelerate launch`` and the Trainer's own FSDP/DeepSpeed support (docs/CPT.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.cpt import data, packing
from hf_residual.cpt.config import CPTConfig, config_from_dict, load_config
from hf_residual.errors import ConfigError, InputNotFoundError

logger = logging.getLogger(__name__)


@dataclass
class CPTResult:
    """What a run did: where it wrote, how far it got, the Trainer's log history and ported folders."""

    output_dir: Path
    global_step: int
    train_loss: float | None
    log_history: list[dict] = field(default_factory=list)
    ported: list[Path] = field(default_factory=list)
    port_failures: list[tuple[int, str]] = field(default_factory=list)
    port_overhead: list[tuple[int, float]] = field(default_factory=list)  # (step, s) of each on_save
    rows: int = 0


def _as_config(config: CPTConfig | dict | str | Path) -> CPTConfig:
    if isinstance(config, CPTConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def build_dataset(config: CPTConfig, tokenizer):
    """Packed rows of the corpus (with replay mixed in), split into train and held-out eval rows."""
    tokenized = packing.tokenize_documents(data.load_corpus(config.corpus), tokenizer, config.text_field)
    if config.replay is not None:
        old = packing.tokenize_documents(
            data.load_corpus(config.replay.corpus), tokenizer, config.replay.text_field
        )
        tokenized = data.mix_replay(tokenized, old, config.replay.share, config.seed)
    rows = packing.pack_documents(tokenized, config.seq_len, config.packing).shuffle(seed=config.seed)
    if config.eval_rows >= len(rows):
        raise ConfigError(
            f"eval_rows ({config.eval_rows}) leaves no training rows out of {len(rows)} packed rows"
        )
    if config.eval_rows:
        split = rows.train_test_split(test_size=config.eval_rows, seed=config.seed, shuffle=False)
        return split["train"], split["test"]
    return rows, None


def _callbacks(config: CPTConfig, world_size: int = 1) -> list:
    """The configured callbacks. Under several processes the drift checks run in the background port of
    each checkpoint (with the port's residual, or a drift-only port when no ``residual_port`` is set)."""
    from hf_residual.cpt.callbacks import InstructionDriftCallback, ResidualPortCallback

    callbacks = []
    d = config.instruction_drift
    background_drift = d is not None and world_size > 1 and d.residual is not None
    drift = (
        {"prompts": d.prompts, "checks": d.checks, "max_new_tokens": d.max_new_tokens, "device": d.device}
        if background_drift
        else None
    )
    if config.residual_port is not None:
        p = config.residual_port
        callbacks.append(
            ResidualPortCallback(
                p.residual, p.alpha, p.push_to, base=p.base, force=p.force, keep_ported=p.keep_ported,
                drift=drift, wait_on_train_end=False,
            )
        )  # fmt: skip
    elif background_drift:
        callbacks.append(
            ResidualPortCallback(
                d.residual, d.alpha, base=d.base, force=d.force, drift=drift, write_ported=False,
                wait_on_train_end=False,
            )
        )  # fmt: skip
    if d is not None and not background_drift:
        d = config.instruction_drift
        callbacks.append(
            InstructionDriftCallback(
                d.prompts, d.checks, residual=d.residual, alpha=d.alpha, base=d.base, force=d.force,
                max_new_tokens=d.max_new_tokens,
            )
        )  # fmt: skip
    return callbacks


def training_arguments(config: CPTConfig):
    from transformers import TrainingArguments

    evaluating = config.eval_steps is not None
    kwargs = dict(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        learning_rate=config.schedule.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        seed=config.seed,
        report_to=config.report_to,
        remove_unused_columns=False,  # the collator needs seq_lengths
        push_to_hub=config.push_to_hub is not None,
        hub_model_id=config.push_to_hub,
        **config.scheduler_arguments(),
    )
    kwargs.update(config.training_args)
    return TrainingArguments(**kwargs)


def _resume(config: CPTConfig) -> str | bool | None:
    from transformers.trainer_utils import get_last_checkpoint

    resume = config.resume_from_checkpoint
    if resume is True:
        last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if last is None:
            raise InputNotFoundError(
                f"resume_from_checkpoint is true but {config.output_dir} holds no checkpoint-* folder; "
                "start without it, or give a checkpoint path"
            )
        return last
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise InputNotFoundError(f"checkpoint {resume} to resume from does not exist")
    return resume or None


def run_cpt(config: CPTConfig | dict | str | Path, callbacks: list | None = None) -> CPTResult:
    """Continually pre-train ``config.model`` on the packed corpus; returns what happened.

    ``callbacks``: further ``TrainerCallback``s. The background ports are waited for after the final
    save, on the main process, so no rank waits on them inside a collective.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    config = _as_config(config)
    resume = _resume(config)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    train_rows, eval_rows = build_dataset(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=getattr(torch, config.dtype), attn_implementation=config.attn_implementation
    )
    packing.prepare_model(model)
    args = training_arguments(config)
    own = _callbacks(config, args.world_size)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=packing.packing_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=own + list(callbacks or []),
    )
    for callback in own:
        callback.attach(trainer)
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    porters = [c for c in own if hasattr(c, "ported")]
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        for porter in porters:
            porter.finish(trainer)
    return CPTResult(
        output_dir=Path(config.output_dir),
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        log_history=list(trainer.state.log_history),
        ported=[p for c in porters for p in c.ported],
        port_failures=[f for c in porters for f in c.failures],
        port_overhead=[o for c in porters for o in c.overhead],
        rows=len(train_rows),
    )
