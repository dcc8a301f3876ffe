"""lm-eval hooks of hf-residual's offline tasks (``!function hooks.*`` in the YAMLs beside this file).

The data are JSONL files shipped in this folder and read with ``datasets.Dataset.from_list``: no Hub
access, no dataset cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_residual.evaluation.verifiers import score

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _splits(name: str):
    import datasets

    rows = _rows(name)
    if name.startswith("if_"):  # nested, variable instruction arguments: keep them as JSON text
        rows = [{**row, "instructions": json.dumps(row["instructions"])} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_instructions(**kwargs):
    return _splits("if_prompts.jsonl")


def load_facts(**kwargs):
    return _splits("mc_facts.jsonl")


def process_instructions(doc: dict, results: list[str]) -> dict:
    """Score one generation against its prompt's verifiable instructions (hf_residual.evaluation.verifiers)."""
    return score(json.loads(doc["instructions"]), results[0])


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    flat = [ok for per_prompt in items for ok in per_prompt]
    return sum(flat) / len(flat) if flat else 0.0
