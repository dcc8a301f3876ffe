"""Few BLAS threads while a block decoder multiplies: the engine's main and writer threads keep two
cores busy.

Why: a lowrank block is a ``(rows x rank) @ (rank x cols)`` product of a few hundred rows. OpenBLAS
splits it over every core by default; in the engine those threads compete with the writer and hasher
threads (and, on a shared machine, with everything else), and their spin-waiting made a 1.5B port from
a lowrank:64 residual take 134 s instead of 31 s on a loaded 2-core machine
(benchmarks/RESULTS.md).

``one_thread(limit)`` caps OpenBLAS's thread count for the ``with`` block and restores it after (about
1 us each way); decoders cap it at ``decode_threads()``: the cores less the engine's two busy threads,
so 1 on a 2-core machine, more where more cores are free. It finds the OpenBLAS that numpy loaded among
the libraries mapped into this process (``/proc/self/maps``); elsewhere (another BLAS, another OS) it
does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# (setter, getter) names in the OpenBLAS builds numpy ships or links (64-bit integer suffixes first).
_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)
_lock = threading.Lock()
_found: list[tuple[object, object] | None] = []


def _openblas() -> tuple[object, object] | None:
    """numpy's OpenBLAS ``(set_num_threads, get_num_threads)``, looked up once; None if not found."""
    with _lock:
        if not _found:
            _found.append(_lookup())
    return _found[0]


def _lookup() -> tuple[object, object] | None:
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure numpy's BLAS is loaded
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in _SYMBOLS:
            if hasattr(lib, setter) and hasattr(lib, getter):
                set_threads, get_threads = getattr(lib, setter), getattr(lib, getter)
                set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
                get_threads.argtypes, get_threads.restype = [], ctypes.c_int
                return set_threads, get_threads
    return None


def decode_threads() -> int:
    """BLAS threads for decoding: the cores this process may use, less two (the engine's main thread and
    its writer thread), at least one: 1 on a 2-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 2)


def threads() -> int | None:
    """OpenBLAS's current thread count (None: numpy's BLAS is not an OpenBLAS found here)."""
    found = _openblas()
    return None if found is None else int(found[1]())


@contextmanager
def one_thread(limit: int = 1) -> Iterator[None]:
    """Run the ``with`` block's BLAS calls on at most ``limit`` threads (default: the calling thread only;
    decoders pass ``decode_threads()``)."""
    found = _openblas()
    if found is None:
        yield
        return
    set_threads, get_threads = found
    before = get_threads()
    if before <= limit:
        yield
        return
    set_threads(limit)
    try:
        yield
    finally:
        set_threads(before)
