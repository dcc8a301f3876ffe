"""Engine plans as pure data: ``TensorJob``s made of ``Segment``s over input ``Source``s, grouped into shards.

A plan is built and checked before any byte is read (``plans``, ``vocab``, ``names`` build them;
``engine.execute`` runs them). Math of one segment, in float32, one rounding at the end:
``out = addend + alpha * (plus - minus)``, where ``minus`` and ``addend`` are optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hf_residual.core import fp8
from hf_residual.core.safetensors_io import OutputTensor, TensorInfo, shard_filenames, write_shard_index

DEFAULT_SHARD_BYTES = 5 * 1024**3


class BlockReader(Protocol):
    """An open encoded tensor (``DecodedInfo``): decodes any run of elements, checks its stored bytes."""

    def read(self, start: int, count: int, out: np.ndarray) -> None:
        """Write the float32 values of elements ``start:start+count`` into ``out[:count]``."""

    def finish(self) -> None:
        """At the end of the tensor's job: raise ``VerificationError`` if a stored part is damaged."""


class BlockDecoder(Protocol):
    """How one encoded tensor is stored (hashable); ``open`` gives a reader for one job."""

    def open(self, fd: Callable[[Path], int]) -> BlockReader:
        """``fd(path)``: the engine's shared read-only descriptor of an input file."""


@dataclass(frozen=True)
class DecodedInfo(TensorInfo):
    """An input tensor stored encoded (a lossy codec's parts), read as float32 a block at a time.

    ``dtype`` is F32 (what the arithmetic sees); ``file``/``offset`` name its first stored part, for
    messages only. The engine reads it with ``decoder.open(...).read`` into a float32 block, which the
    fused kernel (or the numpy path) then combines like any float32 input, so compressed residuals are
    applied in the stream with no decoded copy on disk.
    """

    decoder: BlockDecoder


def is_decoded(info: TensorInfo) -> bool:
    return isinstance(info, DecodedInfo)


@dataclass(frozen=True)
class Source:
    """A run of elements of an input tensor, starting at element ``start``.

    ``sha256``: the digest the whole input tensor's bytes must have (a residual's, from its manifest).
    The engine hashes the raw bytes as it reads them (no second pass), across every segment that reads
    the tensor, and raises ``VerificationError`` at the end of the tensor's job if they differ, before the
    shard is closed.
    """

    info: TensorInfo
    start: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class Segment:
    """Output elements ``start:stop`` = ``addend + alpha * (plus - minus)``."""

    start: int
    stop: int
    plus: Source
    minus: Source | None = None
    alpha: float = 1.0
    addend: Source | None = None
    # When set, count elements where ``minus + result``, rounded to this source's dtype, is not
    # bit-identical to it: how a float32 residual proves it is lossless.
    roundtrip_of: Source | None = None
    # A merge method other than task_arithmetic (``methods.SegmentMethod``): changes the residual
    # ``plus - minus`` block by block before ``alpha``; the engine then takes the numpy path.
    method: object | None = None


@dataclass(frozen=True)
class TensorJob:
    """One output tensor; with ``quantize``, an FP8 tensor followed by its block scales (``quantize.scale``)."""

    out: OutputTensor
    segments: tuple[Segment, ...]
    collect_norms: bool = False
    quantize: fp8.Quantize | None = None

    @property
    def outputs(self) -> tuple[OutputTensor, ...]:
        return (self.out,) if self.quantize is None else (self.out, self.quantize.scale)

    @property
    def nbytes(self) -> int:
        return sum(out.nbytes for out in self.outputs)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)


@dataclass
class TensorStats:
    """What execution learned about one output tensor."""

    sha256: str
    plus_norm: float = 0.0
    minus_norm: float = 0.0
    result_norm: float = 0.0
    inexact: int = 0
    # An FP8 output's block scales (``TensorJob.quantize``), written as the tensor after it.
    scales: np.ndarray | None = None


def plan_shards(
    jobs: list[TensorJob], prefix: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[ShardPlan]:
    """Group jobs, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.nbytes
    names = shard_filenames(prefix, len(groups))
    return [ShardPlan(name, tuple(group)) for name, group in zip(names, groups, strict=True)]


def write_index(folder: Path, prefix: str, shards: list[ShardPlan], metadata: dict | None = None) -> None:
    """Write ``<prefix>.safetensors.index.json`` (only when there is more than one shard)."""
    weight_map = {out.name: shard.filename for shard in shards for job in shard.jobs for out in job.outputs}
    write_shard_index(folder, prefix, weight_map, sum(s.nbytes for s in shards), metadata)


def total_bytes(shards: Iterable[ShardPlan]) -> int:
    return sum(shard.nbytes for shard in shards)
