"""Test helpers: load a folder's tensors with the real safetensors library for comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so comparisons are exact (NaN-safe, -0.0 distinct from 0.0)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view)


def reference_port(
    target: torch.Tensor, instruct: torch.Tensor, base: torch.Tensor, alpha: float
) -> torch.Tensor:
    """float32 math, one rounding to the target dtype: T + alpha * (I - B)."""
    residual = instruct.float() - base.float()
    if alpha != 1.0:
        residual = residual * torch.tensor(alpha, dtype=torch.float32)
    return (target.float() + residual).to(target.dtype)
