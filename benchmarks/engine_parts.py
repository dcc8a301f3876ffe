"""Fixed costs of the engine, each measured side by side in one run (issue 14 §5).

- ``load``: a fresh interpreter imports numba and makes its first dispatch (``core.fused.load()``), with
  the scipy deferral of ``core.fused`` and without it (numba's first dispatch then imports scipy);
  wall and CPU seconds, alternating.
- ``compare``: the writer's read-back comparison of one 512 KB block, ``np.array_equal`` vs ``memcmp``
  (``core.shard_files.same_bytes``).
- ``error``: ``hf-residual port`` stopped by an error found while planning (a base folder with no
  weights), with this tree and with ``--baseline-src`` (e.g. one where ``core.fused`` imported numba).

Usage::

    python benchmarks/engine_parts.py load compare --repeat 6
    python benchmarks/engine_parts.py error --family benchmarks/_work/1.1b-l4 --baseline-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOAD = """
import contextlib, time
from hf_residual.core import fused
if {plain}:
    fused._scipy_deferred = contextlib.nullcontext
started = time.perf_counter()
fused.load()
print(time.perf_counter() - started)
"""


def child(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds user+system of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.stdout


def load(repeat: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {"deferred": [], "plain": []}
    for _ in range(repeat):
        for mode in results:
            _, cpu, out = child([sys.executable, "-c", LOAD.format(plain=mode == "plain")])
            results[mode].append((float(out.split()[-1]), cpu))
    for mode, runs in results.items():
        print(
            f"numba load, scipy {mode:8}: load() wall {' '.join(f'{w:.2f}' for w, _ in sorted(runs))} s; "
            f"process CPU {' '.join(f'{c:.2f}' for _, c in sorted(runs, key=lambda r: r[1]))} s"
        )


def compare(repeat: int) -> None:
    from hf_residual.core.shard_files import same_bytes

    a = np.random.default_rng(0).integers(0, 256, 1 << 19, dtype=np.uint8)
    b = a.copy()
    for name, function in (("np.array_equal", np.array_equal), ("memcmp (same_bytes)", same_bytes)):
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            for _ in range(300):
                function(a, b)
            best = min(best, (time.perf_counter() - started) / 300)
        print(f"compare 512 KB, {name:20}: {best * 1e6:.1f} us per block (best of {repeat} x 300)")


def error(repeat: int, family: Path, baselines: list[str]) -> None:
    empty = Path(tempfile.mkdtemp(prefix="no-weights-"))
    variants = [("this tree", None)] + [(src, str(Path(src).absolute())) for src in baselines]
    results: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in variants}
    command = [
        sys.executable,
        "-m",
        "hf_residual.cli",
        "port",
        str(family / "instruct"),
        "--base",
        str(empty),
    ]
    for _ in range(repeat):
        for label, src in variants:
            env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
            wall, cpu, _ = child([*command, "--to", str(family / "cpt"), "-o", str(empty / "out")], env=env)
            results[label].append((wall, cpu))
    for label, runs in results.items():
        print(
            f"planning error, {label}: wall {' '.join(f'{w:.2f}' for w, _ in sorted(runs))} s; "
            f"CPU {' '.join(f'{c:.2f}' for _, c in sorted(runs, key=lambda r: r[1]))} s"
        )
    empty.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="+", choices=["load", "compare", "error"], help="what to measure")
    parser.add_argument("--repeat", type=int, default=6, help="alternating rounds")
    parser.add_argument("--family", type=Path, help="for 'error': a port_speed.py family folder")
    parser.add_argument("--baseline-src", action="append", default=[], help="for 'error': another src/")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for part in args.parts:
        if part == "load":
            load(args.repeat)
        elif part == "compare":
            compare(args.repeat)
        else:
            error(args.repeat, args.family, args.baseline_src)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
