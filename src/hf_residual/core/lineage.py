"""Is the target a descendant of the base, and is the residual more than nothing? Cheap checks on a sample.

What is measured: the same elements of each tensor are read from both models (``sample``), and each
tensor gets its own relative distance ``d = |T - B| / |B|`` over its sampled elements. The verdict is the
median of ``d`` over the weight matrices (tensors of two or more dimensions: projections, embeddings).
Norm weights and biases (1-D) are reported apart and never decide: unrelated models initialise norm
weights alike (all 1.0), and because those values are ~50x larger than matrix entries, one distance summed
over all tensors is dominated by them (an unrelated model with equal norms measured 0.05 that way).

Measured medians (tests/test_guards_lineage.py): descendants stay below the limit with margin (toy
families 0.03-0.05; a tiny pre-trained Llama continued 300 steps 0.13, fine-tuned 100 steps 0.15; the demo's
CPT'd bases 0.07-0.15 and its SFT'd instruct models 0.31-0.40 from their base), while a model of the same
shape that does not descend from the base gives 1.40-1.48 whatever its norm weights: independent weights
give ``|T - B| >= |B|`` (1.0 even for a target with tiny weights, about 1.4 for weights of the base's
scale). The limit, ``MAX_RELATIVE_DISTANCE``, is 0.7.

The sample: ``SAMPLES_PER_TENSOR`` elements per tensor, read as ``RUNS`` contiguous runs spread evenly over
the tensor (one read each), so the cost is a few reads per tensor whatever the model size: on a
Qwen2-0.5B-shaped checkpoint (290 tensors) all checks of a port (base, target and instruct sampled, 5952
reads) took 0.4 s with the files cached and 2.0 s cold, against 6.5 s and 51 s for the port itself; an 8B
model has about as many tensors, so there it is well under 1%. A residual's
manifest stores the base's sample per tensor (``base_sample``), so ``apply`` checks without the base.
Manifests written before this scheme hold 16 evenly spaced elements; the positions follow from the count
(``sample_runs``), so those are still read and checked.

The zero-residual check (``residual_ratio``): the RMS over tensors of each tensor's ``|I - B| / |B|``.
Measured: toy families 0.047-0.054, the demo's instruct models 0.29 (quick) and 0.40 (tiny), a 100-step
fine-tune of a tiny pre-trained Llama 0.07 (lr 1e-4) to 0.13 (lr 3e-4). Below ``MIN_RESIDUAL_RATIO`` (1e-4,
over 400x below the smallest of those) the
instruct model is taken to be its base or a copy of it: a mistake. In bfloat16 one changed element already
moves by 2^-8 (0.4%) of itself, so a ratio under 1e-4 means almost no element changed at all.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hf_residual.core.kernels import BlockBuffers, decode
from hf_residual.core.safetensors_io import TensorInfo

SAMPLES_PER_TENSOR = 128
RUNS = 8
LEGACY_SAMPLES = 16  # manifests written before the run-based sample: 16 evenly spaced elements
MAX_RELATIVE_DISTANCE = 0.7
MIN_RESIDUAL_RATIO = 1e-4


def sample_runs(numel: int, count: int = SAMPLES_PER_TENSOR) -> list[tuple[int, int]]:
    """``(start, length)`` runs of the sampled elements of a tensor of ``numel`` elements.

    ``count`` >= ``numel``: every element. ``count`` <= 16: evenly spaced single elements (the scheme of
    older manifests). Otherwise ``RUNS`` runs that together hold ``count`` elements, evenly spread.
    """
    if numel <= 0 or count <= 0:
        return []
    if count >= numel:
        return [(0, numel)]
    if count <= LEGACY_SAMPLES:
        return [(int(p), 1) for p in np.linspace(0, numel - 1, count).astype(np.int64)]
    runs = min(RUNS, count)
    lengths = [count // runs + (1 if i < count % runs else 0) for i in range(runs)]
    starts = np.linspace(0, numel - lengths[0], runs).astype(np.int64)
    return [(int(s), n) for s, n in zip(starts, lengths, strict=True)]


def sample(info: TensorInfo, count: int = SAMPLES_PER_TENSOR, within: int | None = None) -> list[float]:
    """Read the sampled elements of one tensor as floats (one read per run).

    ``within``: sample the first ``within`` elements only (an instruct tensor with extra vocabulary rows
    is sampled where its base has elements).
    """
    runs = sample_runs(info.numel if within is None else min(within, info.numel), count)
    longest = max((n for _, n in runs), default=0)
    buffers = BlockBuffers(max(longest, 1))
    values = np.empty(max(longest, 1), np.float32)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        out: list[float] = []
        for start, length in runs:
            decode(fd, info, start, length, values, buffers)
            out.extend(values[:length].tolist())
        return out
    finally:
        os.close(fd)


def _relative(a: list[float], b: list[float]) -> float | None:
    """``|a - b| / |b|`` of one tensor's samples; None when ``b`` is all zero (no scale to compare with)."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    scale = float(np.sqrt(np.dot(y, y)))
    if scale == 0.0:
        return None
    return float(np.linalg.norm(x - y)) / scale


@dataclass(frozen=True)
class Distance:
    """Per-tensor relative distances of the target from the base, summarised."""

    matrices: float  # median over weight matrices (2+ dims): the verdict
    vectors: float | None  # median over 1-D tensors (norm weights, biases): reported apart
    matrix_count: int
    vector_count: int
    matrices_over_limit: int  # how many matrices are above MAX_RELATIVE_DISTANCE

    def describe(self) -> str:
        vectors = "none" if self.vectors is None else f"{self.vectors:.2f}"
        return (
            f"median |T - B| / |B| per weight matrix = {self.matrices:.2f} ({self.matrices_over_limit} of "
            f"{self.matrix_count} matrices above {MAX_RELATIVE_DISTANCE}; norm weights and biases: median "
            f"{vectors})"
        )


def relative_distance(
    target: Mapping[str, list[float]], base: Mapping[str, list[float]], ndim: Mapping[str, int]
) -> Distance:
    """Each tensor's ``|T - B| / |B|`` on its samples; median over matrices, 1-D tensors apart.

    Tensors whose base sample is all zero have no scale and are left out. With no matrix at all (an
    unusual model), the 1-D tensors decide.
    """
    matrices: list[float] = []
    vectors: list[float] = []
    for name, base_values in base.items():
        d = _relative(target[name], base_values)
        if d is not None:
            (matrices if ndim[name] >= 2 else vectors).append(d)
    vector_median = statistics.median(vectors) if vectors else None
    decisive = matrices or vectors
    return Distance(
        matrices=statistics.median(decisive) if decisive else 0.0,
        vectors=vector_median,
        matrix_count=len(matrices),
        vector_count=len(vectors),
        matrices_over_limit=sum(d > MAX_RELATIVE_DISTANCE for d in decisive),
    )


def residual_ratio(pairs: list[tuple[float, float]]) -> float:
    """RMS over tensors of ``|R| / |B|``, from ``(|R|, |B|)`` per tensor (tensors with ``|B|`` 0 left out).

    Each tensor counts alike, so a residual confined to a few tensors (a merged LoRA on two projections)
    still shows, and norm weights do not drown matrices. With no tensor to measure against (every base
    sample zero): 0.0 if the residual is zero too, else infinity.
    """
    ratios = [r / b for r, b in pairs if b > 0]
    if ratios:
        return float(np.sqrt(np.mean(np.square(ratios))))
    return 0.0 if all(r == 0 for r, _ in pairs) else float("inf")


def sample_norms(
    instruct: Mapping[str, list[float]], base: Mapping[str, list[float]]
) -> list[tuple[float, float]]:
    """``(|I - B|, |B|)`` per tensor on the samples, for ``residual_ratio`` before any arithmetic."""
    out = []
    for name, base_values in base.items():
        b = np.asarray(base_values, np.float64)
        i = np.asarray(instruct[name], np.float64)
        out.append((float(np.linalg.norm(i - b)), float(np.linalg.norm(b))))
    return out
