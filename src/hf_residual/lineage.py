"""Is the target a descendant of the base? A cheap check on a fixed sample of elements per tensor.

A continually pre-trained or fine-tuned model stays close to its base: on the same sampled elements,
``|T - B| / |B|`` is small (typically < 0.1). An unrelated model of the same shape (another random init,
another pre-training run) gives about 1.4. The sample (``SAMPLES_PER_TENSOR`` evenly spaced elements of
each tensor) is stored in a residual's manifest, so ``apply`` can check without the base weights.
"""

from __future__ import annotations

import os

import numpy as np

from hf_residual.kernels import BlockBuffers, decode
from hf_residual.safetensors_io import TensorInfo

SAMPLES_PER_TENSOR = 16
MAX_RELATIVE_DISTANCE = 0.5


def sample_positions(numel: int, limit: int | None = None) -> np.ndarray:
    """Evenly spaced element indices within the first ``limit`` (default: all) elements."""
    span = numel if limit is None else min(numel, limit)
    count = min(SAMPLES_PER_TENSOR, span)
    return np.linspace(0, span - 1, count).astype(np.int64) if count else np.zeros(0, np.int64)


def sample(info: TensorInfo, limit: int | None = None) -> list[float]:
    """Read the sampled elements of one tensor as floats (one small read each)."""
    positions = sample_positions(info.numel, limit)
    buffers = BlockBuffers(1)
    value = np.empty(1, np.float32)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        out = []
        for position in positions:
            decode(fd, info, int(position), 1, value, buffers)
            out.append(float(value[0]))
        return out
    finally:
        os.close(fd)


def relative_distance(target: dict[str, list[float]], base: dict[str, list[float]]) -> float:
    """``|T - B| / |B|`` over the sampled elements of the tensors both have."""
    diff = norm = 0.0
    for name, base_values in base.items():
        t = np.asarray(target[name], np.float64)
        b = np.asarray(base_values, np.float64)
        diff += float(np.sum((t - b) ** 2))
        norm += float(np.sum(b**2))
    return (diff / norm) ** 0.5 if norm > 0 else 0.0
