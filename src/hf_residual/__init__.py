"""hf-residual: instruction residuals (instruct - base) computed once and added to new base models.

The public Python API mirrors the CLI: ``extract``, ``apply``, ``port``, ``inspect``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "extract", "apply", "port", "inspect"]


def __getattr__(name: str):
    # Lazy so that ``import hf_residual.engine`` stays light (no transformers, no huggingface_hub).
    if name in ("extract", "apply", "port", "inspect"):
        from hf_residual import api

        return getattr(api, name)
    raise AttributeError(name)
