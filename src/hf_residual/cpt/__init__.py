"""Continual pre-training: a news corpus (Fundus), packing with per-document attention, a Trainer
run (``run_cpt``) and callbacks that keep an instruction-following version of every checkpoint.

Heavy libraries (torch, transformers, trl, datasets, fundus) are imported by the modules that need
them, so ``import hf_residual.cpt`` stays cheap; names are loaded on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CPTConfig": "config",
    "load_config": "config",
    "run_cpt": "train",
    "ResidualPortCallback": "callbacks",
    "InstructionDriftCallback": "callbacks",
    "pack_documents": "packing",
    "tokenize_documents": "packing",
    "packing_collator": "packing",
    "build_corpus": "corpus",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
