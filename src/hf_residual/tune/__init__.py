"""``hf-residual tune``: search a port's settings (alpha, per-module alpha, merge method) for the best
balance between instruction following and the knowledge the target gained.

Modules, one job each: ``probes`` (what is scored, and loading it), ``scoring`` (a model folder's scores),
``space`` (candidates and their ``alpha_for`` regexes), ``cache`` (evaluated candidates, model hashes),
``report`` (Pareto front, the choice, table and figure), ``search`` (``tune``, the Optuna loop).
"""

from hf_residual.tune.probes import (
    IFPrompt,
    Probes,
    QAPair,
    demo_probes,
    load_if_prompts,
    load_qa,
    load_texts,
)
from hf_residual.tune.search import TuneResult, tune

__all__ = [
    "IFPrompt",
    "Probes",
    "QAPair",
    "TuneResult",
    "demo_probes",
    "load_if_prompts",
    "load_qa",
    "load_texts",
    "tune",
]
