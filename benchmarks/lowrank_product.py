"""CPU time per element of the lowrank decode's float64 product, one BLAS thread, per block shape.

A lowrank block decodes as ``float32(float64(B[rows]) @ float64(A))`` (docs/CODECS.md). This times
``np.matmul`` over the shapes a port of the 1.5B family (benchmarks/codecs_stream.py) meets: rank 64,
1536 columns (q/k/v/o, gate, up) and 8960 (down_proj), for several row counts, and prints the kernel
family OpenBLAS chose (``get_corename``). Run it twice to compare kernel families, e.g.::

    python benchmarks/lowrank_product.py
    OPENBLAS_CORETYPE=SKYLAKEX python benchmarks/lowrank_product.py   # only on a CPU with AVX-512
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from hf_residual.codecs import blas

SHAPES = [(30, 8960), (120, 8960), (146, 8960), (171, 1536), (683, 1536)]


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"OpenBLAS core: {_corename()}")
    with blas.one_thread():
        for rows, cols in SHAPES:
            b, a = rng.standard_normal((rows, 64)), rng.standard_normal((64, cols))
            out = np.empty((rows, cols))
            n = max(3, int(3e8 / (rows * cols)))
            best = float("inf")
            for _ in range(3):
                started = time.thread_time()
                for _ in range(n):
                    np.matmul(b, a, out=out)
                best = min(best, (time.thread_time() - started) / (n * rows * cols) * 1e9)
            print(f"{rows:4d} x 64 x {cols:5d}: {best:.2f} ns/element (CPU, best of 3)")


def _corename() -> str:
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    for path in paths:
        if path:
            lib = ctypes.CDLL(path)
            for name in (
                "scipy_openblas_get_corename64_",
                "openblas_get_corename64_",
                "openblas_get_corename",
            ):
                if hasattr(lib, name):
                    function = getattr(lib, name)
                    function.restype = ctypes.c_char_p
                    return function().decode()
    return "?"


if __name__ == "__main__":
    main()
