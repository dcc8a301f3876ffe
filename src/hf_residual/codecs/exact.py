"""The exact float32 residual ``I - B``, one tensor at a time in memory, straight from the model files.

What ``extract --codec`` encodes (and ``--probe`` compares against): each tensor of the extract plan
(``plans.extract_jobs``: ``I - B`` on the base's rows, the instruct's new vocabulary rows as they are)
is computed with the engine's block reader (``kernels.decode``: bfloat16, float16, FP8 with scales) and
the same float32 arithmetic as the engine's float32 extract, so the values equal those of a float32
residual folder bit for bit, without writing one. Memory: one tensor in float32 (an SVD needs it whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hf_residual.core import blocks, kernels
from hf_residual.core.engine import DEFAULT_BLOCK
from hf_residual.core.jobs import TensorJob
from hf_residual.core.writer import Files
from hf_residual.errors import NonFiniteError


@dataclass
class ExactTensor:
    """One tensor of the exact residual, and the norms its manifest entry records."""

    name: str
    values: np.ndarray  # float32, the tensor's shape
    base_norm: float
    residual_norm: float


def exact_tensors(jobs: list[TensorJob], block: int = DEFAULT_BLOCK) -> Iterator[ExactTensor]:
    """Each job's ``plus - minus`` (or ``plus`` alone) over its segments, in whole engine blocks of rows."""
    files, buffers = Files(), kernels.BlockBuffers(block)
    try:
        for job in jobs:
            yield _compute(job, files, buffers)
    finally:
        files.close()


def _compute(job: TensorJob, files: Files, buffers: kernels.BlockBuffers) -> ExactTensor:
    shape = job.out.shape
    values = np.empty(int(np.prod(shape)), np.float32)
    cols = shape[-1] if len(shape) == 2 else 0
    step = buffers.block // cols * cols if 0 < cols <= buffers.block else buffers.block  # whole rows (FP8)
    base_power = residual_power = 0.0
    for segment in job.segments:
        for start in range(segment.start, segment.stop, step):
            count = min(segment.stop, start + step) - start
            offset = start - segment.start
            view = values[start : start + count]
            plus = segment.plus
            kernels.decode(files.fd(plus.info.file), plus.info, plus.start + offset, count, view, buffers)
            if segment.minus is not None:
                minus, tmp = segment.minus, buffers.tmp[:count]
                kernels.decode(
                    files.fd(minus.info.file), minus.info, minus.start + offset, count, tmp, buffers
                )
                base_power += blocks.sum_squares(tmp)
                view -= tmp
            if not np.isfinite(view).all():
                raise NonFiniteError(
                    blocks.non_finite_message(job, segment, offset, offset + count, files, buffers)
                )
            residual_power += blocks.sum_squares(view)
    return ExactTensor(job.out.name, values.reshape(shape), base_power**0.5, residual_power**0.5)
