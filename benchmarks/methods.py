"""What the merge methods cost ``port``, side by side in one run: task_arithmetic (fused kernels),
per-tensor alpha (still fused), ties (numpy path, two threshold passes), dare (numpy path, hashed mask)
and orthogonal (numpy path, one exact dot-product pass).

Builds (once) a toy Llama family in bfloat16 (``hf_residual.toy.build_family``; ``--hidden``/``--layers``
set its size), then runs ``hf-residual port`` for each variant under ``/usr/bin/time -v`` (wall time and
peak RSS), ``--repeat`` rounds in alternating order, page cache warm. Usage::

    python benchmarks/methods.py --hidden 1024 --layers 4 --repeat 3
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "task_arithmetic": [],
    "alpha_for (2 patterns)": ["--alpha-for", "embed_tokens|lm_head=0.5", "--alpha-for", r"layers\.0\.=1.2"],
    "dare:p=0.5,seed=0": ["--method", "dare:p=0.5,seed=0"],
    "ties:density=0.5": ["--method", "ties:density=0.5"],
    "orthogonal": ["--method", "orthogonal"],
}


def run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "methods")
    args = parser.parse_args()

    from hf_residual.toy import build_family

    root = args.work / f"h{args.hidden}-l{args.layers}"
    if not (root / "cpt" / "config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        build_family(root, "llama", "bfloat16", hidden=args.hidden, layers=args.layers)
    size = sum(f.stat().st_size for f in (root / "cpt").glob("*.safetensors"))
    exe = [
        sys.executable,
        "-m",
        "hf_residual.cli",
        "port",
        str(root / "instruct"),
        "--base",
        str(root / "base"),
    ]
    exe += ["--to", str(root / "cpt"), "--overwrite", "-q"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeat):
        for name, flags in VARIANTS.items():
            results[name].append(run([*exe, "-o", str(args.work / "out"), *flags]))
    base_wall = min(w for w, _ in results["task_arithmetic"])
    print(
        f"port of a {size / 1e6:.0f} MB bf16 model (hidden {args.hidden}, {args.layers} layers), {args.repeat} rounds"
    )
    print(f"{'method':<24} {'wall min':>9} {'wall median':>12} {'vs task_arith':>14} {'peak RSS':>9}")
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        rss = max(r for _, r in runs)
        print(
            f"{name:<24} {min(walls):>8.2f}s {statistics.median(walls):>11.2f}s "
            f"{min(walls) / base_wall:>13.2f}x {rss:>7.0f}MB"
        )
    shutil.rmtree(args.work / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
