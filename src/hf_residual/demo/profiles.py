"""Demo profiles: every size, step count and learning rate of a run, in one frozen record.

``quick`` is the default (under 2 minutes on 2 free CPU cores), ``full`` the same world and recipe on a model
twice as large, ported at alpha 0.9 (passes the required pattern on seeds 0-2, docs/DEMO.md), ``tiny`` the
family the default tests build (seconds). Changing a field changes the cache keys of the stages it feeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hf_residual.demo.training import ModelShape
from hf_residual.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    name: str
    shape: ModelShape
    n_a: int  # entities of world A (pre-training and chat)
    n_b: int  # entities of world B (continual pre-training only)
    vocab_size: int = 640
    seq_len: int = 64
    batch_size: int = 32
    holdout: float = 0.2  # share of A (fact, format) combinations kept out of SFT for evaluation
    eval_per_set: int = 64  # chat prompts per evaluation set (held-out A, and B)
    pretrain_docs: int = 600
    pretrain_epochs: int = 15  # 6 left the base knowing a third of A's facts (docs/DEMO.md)
    pretrain_lr: float = 3e-3
    sft_epochs: int = 3
    sft_lr: float = 1e-3
    sft_batch: int = 32
    # SFT that changes fewer weights: parameters whose name contains one of these stay frozen
    # (e.g. ("mlp",); tried in docs/DEMO.md, off by default).
    sft_freeze: tuple[str, ...] = ()
    sft_replay: int = 0  # rows of corpus A plain text added to each SFT batch (tried; off by default)
    cpt_tokens: tuple[int, ...] = (36_000, 90_000, 180_000)  # the paper's 100M / 500M / 1B, scaled down
    cpt_docs: int = 400  # documents of corpus B; CPT cycles through them until its token count is reached
    cpt_batch: int = 16
    cpt_lr: float = 2.5e-4
    cpt_warmup: int = 10
    cpt_decay: str = "constant"  # "constant": one run, snapshots at each size; "cosine": a run per size
    cpt_replay: float = 0.5  # share of CPT rows drawn from corpus A (replay, Ibrahim et al. 2024)
    alpha: float = 1.0
    # DocChat in miniature (the paper's Table 4, demo/docchat.py): the base fine-tuned in plain text on
    # answering from a passage (docchat_train examples; 0 leaves the derived model out), then ported.
    # Replay of corpus A keeps it near the base: without it (LR 2e-3) the derived model learned the skill
    # (0.76) but forgot A and the residual gave it no IF (0.01); docs/DEMO.md has the variants.
    docchat_train: int = 1600
    docchat_eval: int = 128
    docchat_epochs: int = 3
    docchat_lr: float = 1e-3
    docchat_replay: int = 8  # rows of corpus A plain text added to each batch
    # The answers' mean loss plus the replay's (training.with_replay(balanced=True)), not one mean over both:
    # 1,600 passages x 3 epochs then teach nearly what 3,200 x 3 did pooled (doc QA 0.62 against 0.71, quick
    # seed 0) in half the steps; pooled, 1,600 x 3 reached 0.34.
    docchat_balanced: bool = True
    # Tuned rows (hf_residual.tune, given to run_demo as ``tuner``): candidates searched on the largest CPT
    # size; the chosen recipe is ported at every size as ``tuned-<size>``. 0 leaves them out.
    tune_budget: int = 4
    max_new_tokens: int = 28  # the longest canonical reply is about 22 tokens
    labels: tuple[str, ...] = field(default=("S", "M", "L"))

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.cpt_tokens) or list(self.cpt_tokens) != sorted(self.cpt_tokens):
            raise ConfigError("cpt_tokens must be increasing sizes, one per label in labels")
        if self.cpt_decay not in ("constant", "cosine"):
            raise ConfigError(f"cpt_decay must be 'constant' or 'cosine', got {self.cpt_decay!r}")
        if not 0 <= self.cpt_replay < 1:
            raise ConfigError(f"cpt_replay is a share of each CPT batch in [0, 1), got {self.cpt_replay}")

    def with_changes(self, **changes) -> Profile:
        """A copy with some fields changed (CLI overrides, variants in docs/DEMO.md)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown demo setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


PROFILES = {
    "tiny": Profile(
        name="tiny",
        shape=ModelShape(hidden=64, layers=2, heads=4, intermediate=192),
        n_a=16,
        n_b=8,
        vocab_size=512,
        eval_per_set=32,
        pretrain_docs=200,
        pretrain_epochs=15,
        sft_epochs=6,
        cpt_tokens=(40_000,),
        cpt_lr=3e-4,
        cpt_replay=0.0,
        labels=("S",),
        docchat_train=0,  # the default tests and the Space's first start stay fast
        tune_budget=0,
    ),
    "quick": Profile(
        name="quick",
        shape=ModelShape(hidden=96, layers=3, heads=4, intermediate=256),
        n_a=32,
        n_b=16,
    ),
    "full": Profile(
        name="full",
        # quick's world, data and recipe on a model twice its size (968k parameters), with the residual at
        # alpha 0.9: passes the required pattern on seeds 0, 1 and 2 (docs/DEMO.md). At alpha 1 seed 0 kept
        # 48% of the new knowledge at M; at 0.8 instruction following fell below 60% of instruct's (seeds 0, 2
        # at L). The earlier full (32 B entities, 1,500 documents x 6 epochs, 5 SFT epochs, CPT 72k / 180k /
        # 360k) passed seed 0 only.
        shape=ModelShape(hidden=128, layers=4, heads=4, intermediate=352),
        n_a=32,
        n_b=16,
        alpha=0.9,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown demo profile {name!r}; choose one of {', '.join(PROFILES)}") from None
