"""What checking a residual's sha256 costs ``apply``: the engine with and without expected digests.

Builds (once) a synthetic residual (N tensors of NUMEL elements, float32 or bfloat16) and a bfloat16
target, then runs the apply jobs alternately without and with the manifest's digests (``Source.sha256``:
the hasher thread hashes the residual's bytes as they are read). Reports wall time and CPU time of all
threads; CPU time is the steadier figure on a shared machine. Usage::

    python benchmarks/apply_checksum_cost.py --tensors 16 --numel 4194304 --dtype f32
    python benchmarks/apply_checksum_cost.py --dtype bf16 --numpy   # the numpy path (no numba)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="the residual's dtype")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--numpy", action="store_true", help="disable the fused (numba) kernels")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hf-residual-bench")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    from hf_residual.core import engine, plans
    from hf_residual.core.checkpoint import open_checkpoint

    root = args.workdir / f"apply-{args.dtype}-{args.tensors}x{args.numel}"
    if not (root / "t" / "model.safetensors").is_file():
        (root / "r").mkdir(parents=True, exist_ok=True)
        (root / "t").mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        cast = torch.float32 if args.dtype == "f32" else torch.bfloat16
        names = [f"w{k:03d}" for k in range(args.tensors)]
        residual = {n: (torch.randn(args.numel, generator=gen) * 1e-3).to(cast) for n in names}
        save_file(residual, root / "r" / "residual.safetensors")
        target = {n: (torch.randn(args.numel, generator=gen) * 0.02).bfloat16() for n in names}
        save_file(target, root / "t" / "model.safetensors")
    r, t = open_checkpoint(root / "r", prefix="residual"), open_checkpoint(root / "t")
    digests = {}
    for name, info in r.tensors.items():
        with open(info.file, "rb") as handle:
            handle.seek(info.offset)
            digests[name] = hashlib.sha256(handle.read(info.nbytes)).hexdigest()
    runs = {"plain": plans.apply_jobs(r, {}, t, 1.0), "sha256": plans.apply_jobs(r, {}, t, 1.0, digests)}
    if args.numpy:
        engine.fused.AVAILABLE = False
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    out = root / "out"
    for rep in range(args.repeat):
        order = list(runs.items()) if rep % 2 == 0 else list(reversed(runs.items()))
        for key, jobs in order:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            os.sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.execute(engine.plan_shards(jobs, "model"), out, checksum=None)
            wall[key].append(time.perf_counter() - started)
            cpu[key].append(time.process_time() - cpu_started)
    shutil.rmtree(out, ignore_errors=True)
    gb = sum(info.nbytes for info in r.tensors.values()) / 1e9
    path = "numpy" if not engine.fused.AVAILABLE else "fused"
    print(f"residual {gb:.3f} GB {args.dtype}, target bf16, {path} path, {args.repeat} runs each")
    for key in runs:
        print(
            f"  {key:7s} wall min {min(wall[key]):.3f} s, median {statistics.median(wall[key]):.3f} s; "
            f"CPU (all threads) median {statistics.median(cpu[key]):.3f} s"
        )
    extra = statistics.median(cpu["sha256"]) - statistics.median(cpu["plain"])
    print(
        f"  checksums cost: wall min {min(wall['sha256']) / min(wall['plain']) - 1:+.0%}, wall median "
        f"{statistics.median(wall['sha256']) / statistics.median(wall['plain']) - 1:+.0%}, CPU "
        f"{extra:+.3f} s ({extra / gb:.2f} CPU-s per GB of residual)"
    )


if __name__ == "__main__":
    main()
