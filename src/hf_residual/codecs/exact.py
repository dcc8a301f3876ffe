"""The exact float32 residual ``I - B``, one tensor at a time, straight from the model files.

What ``extract --codec`` encodes (and ``--probe`` compares against): each tensor of the extract plan
(``plans.extract_jobs``: ``I - B`` on the base's rows, the instruct's new vocabulary rows as they are)
is computed with the engine's block reader (``kernels.decode``: bfloat16, float16, FP8 with scales) and
the same float32 arithmetic as the engine's float32 extract, so the values equal those of a float32
residual folder bit for bit, without writing one. A tensor is computed on demand, as often as its
encoder asks: whole (``values``: an SVD needs the matrix) or in consecutive chunks through one reused
buffer (``chunks``: the streamed encoders, ``encode_stream``), with the same values and norms either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from hf_residual.core import blocks, kernels
from hf_residual.core.engine import DEFAULT_BLOCK
from hf_residual.core.jobs import TensorJob
from hf_residual.core.writer import Files
from hf_residual.errors import NonFiniteError


class ExactTensor:
    """One tensor of the exact residual; each full pass (``values`` or ``chunks``) sets its norms."""

    def __init__(self, job: TensorJob, files: Files, buffers: kernels.BlockBuffers, block_out: np.ndarray):
        self.job, self.files, self.buffers, self.block_out = job, files, buffers, block_out
        self.name = job.out.name
        self.shape = tuple(int(d) for d in job.out.shape)
        self.numel = int(np.prod(self.shape))
        self.base_norm: float | None = None
        self.residual_norm: float | None = None

    def values(self) -> np.ndarray:
        """The whole tensor in float32 (memory: the tensor)."""
        values = np.empty(self.numel, np.float32)
        for _ in self._pass(lambda start, count: values[start : start + count]):
            pass
        return values.reshape(self.shape)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The flat tensor in consecutive pieces of ``size`` elements (the last one shorter), each yielded
        in one reused buffer (valid until the next); memory: that buffer and one engine block."""
        chunk, fill, seen = np.empty(min(size, max(self.numel, 1)), np.float32), 0, 0
        for block in self._pass(lambda start, count: self.block_out[:count]):
            taken, seen = 0, seen + block.size
            while taken < block.size:
                n = min(block.size - taken, chunk.size - fill)
                chunk[fill : fill + n] = block[taken : taken + n]
                fill, taken = fill + n, taken + n
                if fill == chunk.size:
                    yield chunk
                    fill = 0
        if fill:
            yield chunk[:fill]
        if seen != self.numel:  # pragma: no cover - the plan's segments cover each tensor once, in order
            raise RuntimeError(f"tensor {self.name!r}: computed {seen} of {self.numel} elements")

    def _pass(self, out: Callable[[int, int], np.ndarray]) -> Iterator[np.ndarray]:
        """``plus - minus`` (or ``plus`` alone) over the job's segments in whole engine blocks of rows,
        each computed into ``out(start, count)`` and yielded; the norms are set at the end."""
        job, files, buffers = self.job, self.files, self.buffers
        cols = self.shape[-1] if len(self.shape) == 2 else 0
        # whole rows (FP8 scales come one row of blocks at a time)
        step = buffers.block // cols * cols if 0 < cols <= buffers.block else buffers.block
        base_power = residual_power = 0.0
        for segment in job.segments:
            for start in range(segment.start, segment.stop, step):
                count = min(segment.stop, start + step) - start
                offset = start - segment.start
                view = out(start, count)
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
                yield view
        self.base_norm, self.residual_norm = base_power**0.5, residual_power**0.5


def exact_tensors(jobs: list[TensorJob], block: int | None = None) -> Iterator[ExactTensor]:
    """Each job's tensor, computed by its consumer while it holds it (the model files stay open); in
    engine blocks of ``block`` elements (default: the engine's)."""
    block = block or DEFAULT_BLOCK
    files, buffers = Files(), kernels.BlockBuffers(block)
    block_out = np.empty(block, np.float32)
    try:
        for job in jobs:
            yield ExactTensor(job, files, buffers, block_out)
    finally:
        files.close()
