"""hf-residual: instruction residuals (instruct - base) computed once and added to new base models.

The public Python API mirrors the CLI: ``extract``, ``apply``, ``port``, ``inspect`` (and their
``Result``/``Summary``). Layers, lowest first: ``errors``, ``core`` (the engine), ``codecs``, ``hub``,
``ops`` (the operations), ``cpt``/``evaluation``/``demo``, ``commands``, ``cli``; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from hf_residual._version import __version__

__all__ = ["__version__", "extract", "apply", "port", "inspect", "Result", "Summary", "Recipe"]


def __getattr__(name: str):
    # Lazy so that ``import hf_residual.core.engine`` stays light (no transformers, no huggingface_hub).
    if name in ("extract", "apply", "port", "inspect", "Result", "Summary", "Recipe"):
        from hf_residual import api

        return getattr(api, name)
    raise AttributeError(name)
