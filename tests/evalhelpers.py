"""Fixed evaluation results for the compare and card tests: the paper's own numbers (Jindal et al. 2024,
Table 3, LLaMa 3 block: L3b, L3i, +3.1Lr), stored as lm-eval results in the layout ``hf-residual eval`` writes.
"""

from __future__ import annotations

from pathlib import Path

from hf_residual.evaluation.store import ResultsStore, result_key
from hf_residual.evaluation.suites import load_suite

# Rows in the paper suite's order: IFEval ILL, ILS, PLL, PLS; MMLU; MMLU-Pro; GSM8K EM, strict-EM;
# Winogrande; HellaSwag acc, acc_n; ARC-easy acc, acc_n; PIQA acc, acc_n; TruthfulQA-mc2.
PAPER_TABLE_3 = {
    "L3b": [
        19.06,
        17.87,
        9.98,
        9.06,
        62.14,
        34.51,
        49.58,
        49.20,
        73.16,
        60.12,
        79.22,
        80.39,
        77.78,
        79.54,
        80.74,
        43.94,
    ],
    "L3i": [
        53.36,
        47.84,
        41.77,
        35.30,
        63.83,
        39.70,
        75.06,
        74.98,
        71.74,
        57.70,
        75.76,
        81.52,
        79.63,
        78.56,
        78.62,
        51.67,
    ],
    "L3b+3.1Lr": [
        57.19,
        51.92,
        43.81,
        37.52,
        66.02,
        38.53,
        75.13,
        74.98,
        72.77,
        59.00,
        78.88,
        81.57,
        78.83,
        79.00,
        80.14,
        52.73,
    ],
}
# The paper's sub-averages (block 1, block 2) and overall averages of these columns.
PAPER_AVERAGES = {
    "L3b": (31.43, 75.85, 51.64),
    "L3i": (53.98, 74.79, 62.94),
    "L3b+3.1Lr": (55.64, 75.74, 64.25),
}
DATASETS = {"ifeval": "google/IFEval", "gsm8k": "openai/gsm8k", "arc_easy": "allenai/ai2_arc"}


def write_paper_results(root: Path, refs: dict[str, str] | None = None) -> Path:
    """A results folder holding the three columns as lm-eval results of the ``paper`` suite."""
    store = ResultsStore(root)
    suite = load_suite("paper")
    for label, values in PAPER_TABLE_3.items():
        ref = (refs or {}).get(label, f"/models/{label}")
        model = store.register(
            ref, f"{label}-sha".ljust(40, "0"), ref if "/" in ref and not ref.startswith("/") else None, label
        )
        it = iter(values)
        for position, spec in enumerate(suite.tasks):
            metrics = {key: next(it) / 100 for key in spec.metrics}
            settings = {
                "task": spec.task,
                "num_fewshot": spec.num_fewshot,
                "limit": None,
                "apply_chat_template": False,
                "backend": "hf",
                "lm_eval_version": "0.4.13",
            }
            key = result_key(model.sha, settings)
            lm_eval = {
                "results": {spec.task: {"alias": spec.task, **metrics}},
                "configs": {spec.task: {"task": spec.task, "dataset_path": DATASETS[spec.task]}}
                if spec.task in DATASETS
                else {},
            }
            store.save(
                model,
                spec.task,
                key,
                {
                    "model": model.__dict__,
                    "task": spec.to_dict(),
                    "position": position,
                    "suite": "paper",
                    "settings": settings,
                    "lm_eval": lm_eval,
                },
            )
    return root
