"""The continual pre-training run as one typed, validated spec, read from YAML or built in Python.

The learning-rate schedule follows Ibrahim et al. (2024): re-warm from zero to the peak learning rate,
then re-decay, either by cosine (to ``min_lr_ratio`` of the peak) or warmup-stable-decay (a constant
phase, then a decay over the last ``decay_steps``). Replay mixes a share of old documents into the new
ones before packing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_residual.errors import ConfigError, InputNotFoundError

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class Replay:
    """A share (0-1, in documents) of old data mixed into the new corpus."""

    corpus: str
    share: float = 0.05
    text_field: str = "text"


@dataclass(frozen=True)
class Schedule:
    """Re-warming and re-decaying: linear warmup, then cosine or warmup-stable-decay or constant."""

    type: str = "cosine"
    learning_rate: float = 3e-5
    warmup_steps: int | None = None
    warmup_ratio: float = 0.01
    decay_steps: int | None = None  # wsd: steps of the final decay (default: decay_ratio of max_steps)
    decay_ratio: float = 0.1
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class PortSpec:
    """``ResidualPortCallback`` settings; ``keep_ported`` None follows ``save_total_limit``."""

    residual: str
    alpha: float = 1.0
    push_to: str | None = None
    base: str | None = None
    force: bool = False
    keep_ported: int | None = None

    def __post_init__(self) -> None:
        if self.keep_ported is not None and self.keep_ported < 1:
            raise ConfigError(f"residual_port.keep_ported must be at least 1, got {self.keep_ported}")


@dataclass(frozen=True)
class DriftSpec:
    """``InstructionDriftCallback`` settings; ``residual`` None scores the raw model only.

    Under several processes the checks run in the background port of every checkpoint instead, on
    ``device`` (default ``cpu``; e.g. ``cuda:0`` when the GPU has room beside training).
    """

    prompts: list[str] | None = None
    checks: list[str] | None = None
    residual: str | None = None
    alpha: float = 1.0
    base: str | None = None
    force: bool = False
    max_new_tokens: int = 24
    device: str | None = None


@dataclass(frozen=True)
class CPTConfig:
    """Everything a run needs; ``training_args`` passes further TrainingArguments through unchanged."""

    model: str
    corpus: str | list[str]
    output_dir: str
    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 4096
    packing: str = "bfd_split"
    replay: Replay | None = None
    schedule: Schedule = field(default_factory=Schedule)
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_steps: int | None = None
    eval_rows: int = 0
    logging_steps: int = 10
    seed: int = 0
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    push_to_hub: str | None = None
    resume_from_checkpoint: bool | str | None = None
    residual_port: PortSpec | None = None
    instruction_drift: DriftSpec | None = None
    report_to: str | list[str] = "none"
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.schedule.type not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule.type!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.replay is not None and not 0 < self.replay.share < 1:
            raise ConfigError(f"replay share must be between 0 and 1 (exclusive), got {self.replay.share}")
        if self.eval_steps is not None and self.eval_rows < 1:
            object.__setattr__(self, "eval_rows", 2)

    def warmup_steps(self) -> int:
        s = self.schedule
        return s.warmup_steps if s.warmup_steps is not None else math.ceil(s.warmup_ratio * self.max_steps)

    def scheduler_arguments(self) -> dict[str, Any]:
        """``lr_scheduler_type``/``lr_scheduler_kwargs``/``warmup_steps`` for transformers' schedulers."""
        s, warmup = self.schedule, self.warmup_steps()
        if s.type == "cosine":
            kwargs = {"min_lr_rate": s.min_lr_ratio}
            return {
                "lr_scheduler_type": "cosine_with_min_lr",
                "lr_scheduler_kwargs": kwargs,
                "warmup_steps": warmup,
            }
        if s.type == "wsd":
            decay = s.decay_steps if s.decay_steps is not None else math.ceil(s.decay_ratio * self.max_steps)
            if warmup + decay > self.max_steps:
                raise ConfigError(
                    f"warmup ({warmup}) + decay ({decay}) steps exceed max_steps ({self.max_steps}); "
                    "shorten them or train longer"
                )
            kwargs = {"num_decay_steps": decay, "min_lr_ratio": s.min_lr_ratio}
            return {
                "lr_scheduler_type": "warmup_stable_decay",
                "lr_scheduler_kwargs": kwargs,
                "warmup_steps": warmup,
            }
        return {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": warmup}


_NESTED = {"replay": Replay, "schedule": Schedule, "residual_port": PortSpec, "instruction_drift": DriftSpec}


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}"
        )
    values = {k: _build(_NESTED[k], v, k) if k in _NESTED and v is not None else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_dict(data: dict) -> CPTConfig:
    """Validate a mapping (as read from YAML) into a ``CPTConfig``; unknown keys are errors."""
    return _build(CPTConfig, data, "the cpt config")


def load_config(path: str | Path, overrides: dict | None = None) -> CPTConfig:
    """Read a YAML config; relative paths in it stay relative to the current folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} not found; write one like the example in docs/CPT.md")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return config_from_dict({**data, **(overrides or {})})
