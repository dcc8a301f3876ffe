"""Few BLAS threads while a block decoder multiplies: the engine's main and writer threads keep two
cores busy.

Why: a lowrank block is a ``(rows x rank) @ (rank x cols)`` product of a few hundred rows. OpenBLAS
splits it over every core by default; in the engine those threads compete with the writer and hasher
threads (and, on a shared machine, with everything else), and their spin-waiting made a 1.5B port from
a lowrank:64 residual take 134 s instead of 31 s on a loaded 2-core machine
(benchmarks/RESULTS.md).

``one_thread(limit)`` caps the BLAS thread count for the ``with`` block and restores it after (about
15 us each way, threadpoolctl); decoders cap it at ``decode_threads()``: the cores less the engine's two
busy threads, so 1 on a 2-core machine, more where more cores are free. threadpoolctl finds the BLAS
numpy loaded (OpenBLAS, MKL, BLIS); where it finds none, nothing is capped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


@functools.cache
def _blas():
    """threadpoolctl's handle on the BLAS libraries loaded in this process (numpy's), found once."""
    from threadpoolctl import ThreadpoolController

    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure numpy's BLAS is loaded
    return ThreadpoolController().select(user_api="blas")


def decode_threads() -> int:
    """BLAS threads for decoding: the cores this process may use, less two (the engine's main thread and
    its writer thread), at least one: 1 on a 2-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 2)


def threads() -> int | None:
    """numpy's BLAS thread count (None: threadpoolctl found no BLAS here)."""
    info = _blas().info()
    return None if not info else int(info[0]["num_threads"])


@contextmanager
def one_thread(limit: int = 1) -> Iterator[None]:
    """Run the ``with`` block's BLAS calls on at most ``limit`` threads (default: the calling thread only;
    decoders pass ``decode_threads()``)."""
    current = threads()
    if current is None or current <= limit:
        yield
        return
    with _blas().limit(limits=limit):
        yield
