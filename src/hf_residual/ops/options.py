"""Options shared by the operations, packed once by each public function (the spirit of mergekit's
``MergeOptions``): where and how to publish (``Publish``) and how to write (``Options``), plus the
parsing of dtype, shard size and alpha values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.core import methods, plans, vocab
from hf_residual.errors import ConfigError

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def normalise_dtype(dtype: str) -> str:
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown residual dtype {dtype!r}; choose float32 (lossless) or bfloat16 (half size)"
        ) from None


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"invalid shard size {size!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise ConfigError(f"alpha must be a finite number, got {alpha}")
    return alpha


@dataclass(frozen=True)
class Publish:
    """Where and how to publish a result on the Hub; ``repo_id`` None means do not publish."""

    repo_id: str | None = None
    create_pr: bool = False
    private: bool | None = None
    commit_message: str | None = None
    dry_run: bool = False
    token: str | None = None

    def card_ref(self, default: str) -> str:
        return self.repo_id or default


@dataclass(frozen=True)
class Merge:
    """How ``port``/``apply`` combine the residual (besides the global ``alpha``), checked when built.

    ``alpha_for``: regex -> alpha, first match wins (``methods.resolve_alphas``); ``method``: a spec
    (``methods.parse_method``); ``base``: the base model for ``apply`` with a method that reads it (ties).
    """

    alpha_for: dict[str, float] = field(default_factory=dict)
    method: str = methods.TASK_ARITHMETIC
    base: str | Path | None = None
    base_revision: str | None = None

    def __post_init__(self) -> None:
        methods.compile_alpha_for(self.alpha_for)  # a bad regex or alpha fails before any download
        object.__setattr__(self, "alpha_for", dict(self.alpha_for or {}))
        self.parsed  # noqa: B018 - an unknown method or parameter fails here too

    @property
    def parsed(self) -> methods.Method:
        return methods.parse_method(self.method)

    @property
    def is_default(self) -> bool:
        return not self.alpha_for and self.parsed.is_default

    def plan(self, jobs: list, names, alpha: float, base=None) -> tuple[list, dict]:
        """``jobs`` with each tensor's alpha and the method set (``plans.with_merge``), and the details."""
        alphas, table = methods.resolve_alphas(names, self.alpha_for, alpha)
        jobs = plans.with_merge(jobs, alphas if self.alpha_for else None, self.parsed, base)
        return jobs, self.details(table)

    def details(self, table: list[dict]) -> dict:
        """What the result's details (and ``--json``) record: the method's spec and the alpha_for table."""
        return {"method": self.parsed.spec, "alpha_for": table}


@dataclass(frozen=True)
class Options:
    """What every operation shares, built once from the public keyword arguments and passed down."""

    max_shard_size: str | int
    overwrite: bool
    progress: bool
    publish: Publish
    force: bool = False
    keep_fp8: bool = False  # port/apply: write the target's FP8 weights as FP8 (plans.fp8_output_jobs)
    vocab_from: str | None = None  # port/apply: whose token wins where target and instruct clash (vocab)
    merge: Merge = field(default_factory=Merge)  # port/apply: alpha_for and the merge method

    def __post_init__(self) -> None:
        vocab.check_vocab_from(self.vocab_from)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)
