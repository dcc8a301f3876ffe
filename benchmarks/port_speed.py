"""Port speed and memory, side by side in one run: hf-residual vs mergekit vs the I/O floor.

Builds (once) a Llama-shaped bf16 family saved sharded by transformers: ``base`` (random init),
``instruct`` and ``cpt`` (small perturbations of it). Then, with the page cache warm, it measures:

- the I/O floor: reading every input byte (3 models) plus writing the output's bytes;
- ``hf-residual port INSTRUCT --base BASE --to CPT``;
- mergekit ``task_arithmetic`` (base_model: base; models cpt and instruct with weight 1), if a Python with
  mergekit is given (``--mergekit-python``; install it in its own venv: it pins its own dependencies);
- the PyPI ``residuals`` package, if a Python with it is given (``--residuals-python``).

Each tool runs under ``/usr/bin/time -v`` for wall time and peak RSS. Usage::

    python benchmarks/port_speed.py --shape 1b --mergekit-python /path/to/mergekit-venv/bin/python
    python benchmarks/port_speed.py --shape 1.1b --repeat 5   # the 1.1B Llama (TinyLlama) shape
    python benchmarks/port_speed.py --shape 8b --layers 4   # memory on an 8B-shaped family
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # TinyLlama-1.1B's shape (the 1.1B family): 1.10B parameters, 2.2 GB in bf16.
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
}

BUILD_SCRIPT = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
root, shape = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(tie_word_embeddings=False, **shape)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(f"{root}/base", max_shard_size="1GB")
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    originals = {}
    for name, p in model.named_parameters():
        originals[name] = p.detach().clone()
        p.add_((torch.randn(p.shape, generator=gen) * 0.002).to(p.dtype))
    model.save_pretrained(f"{root}/instruct", max_shard_size="1GB")
    for name, p in model.named_parameters():
        p.copy_(originals[name] + (torch.randn(p.shape, generator=gen) * 0.002).to(p.dtype))
    model.save_pretrained(f"{root}/cpt", max_shard_size="1GB")
"""


def build_family(root: Path, shape: dict) -> None:
    if all((root / name / "config.json").is_file() for name in ("base", "instruct", "cpt")):
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"building family in {root} ...", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(root), json.dumps(shape)], check=True)
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_all(files: list[Path]) -> float:
    """Read every byte into one reused 8 MB buffer: the fastest plain read, so the floor is not flattered."""
    buffer = bytearray(8 * 1024 * 1024)
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def write_bytes(folder: Path, nbytes: int, fsync: bool = False) -> float:
    """Write ``nbytes`` (like the output) in 8 MB chunks; with ``fsync``, until they are on the disk.

    Without fsync is the floor the tools are compared with (as in earlier results); hf-residual makes its
    output durable before publishing it, so the fsync and O_DIRECT rows say what the disk itself allows.
    """
    chunk = os.urandom(8 * 1024 * 1024)
    path = folder / "floor.bin"
    settle()
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        left = nbytes
        while left > 0:
            left -= handle.write(memoryview(chunk)[: min(left, len(chunk))])
        if fsync:
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def write_direct(folder: Path, nbytes: int, read_back: bool) -> float:
    """Write ``nbytes`` with O_DIRECT in 8 MB chunks (rounded up to whole chunks), then fsync; with
    ``read_back``, read each chunk back from the disk as it is written (what hf-residual's writer does)."""
    size = 8 * 1024 * 1024
    chunk, back = mmap.mmap(-1, size), mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    chunk.write(os.urandom(size))
    path = folder / "floor.bin"
    settle()
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    read_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(0, nbytes, size):
            os.pwritev(fd, [chunk], offset)
            if read_back:
                os.preadv(read_fd, [back], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(read_fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (``--cold``), leaving every other file's cached."""
    os.sync()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def settle() -> None:
    """Flush earlier runs' dirty pages first, so no run is slowed by another's writeback."""
    os.sync()
    time.sleep(0.5)


def timed(command: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """Run under /usr/bin/time -v: (wall seconds, peak RSS GiB, output tail, CPU seconds user+system)."""
    settle()
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    cpu = sum(
        float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1))
        for kind in ("User", "System")
    )
    return wall, rss_kb / 1024**2, done.stdout[-500:], cpu


def same_work_floor(env: dict) -> str:
    """The floor row doing the I/O a port does under ``env``: O_DIRECT output (read back unless
    HF_RESIDUAL_VERIFY_WRITES=0), or with HF_RESIDUAL_DIRECT_IO=0 a page-cache output fsynced before
    publishing (its per-block read-back comes from the page cache: no disk read)."""
    if env.get("HF_RESIDUAL_DIRECT_IO") == "0":
        return "I/O floor, output fsynced (durable)"
    if env.get("HF_RESIDUAL_VERIFY_WRITES") == "0":
        return "I/O floor, output O_DIRECT (durable)"
    return "I/O floor, O_DIRECT + read back"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(folder))


def compare_outputs(a: Path, b: Path) -> str:
    """Bit-compare two outputs tensor by tensor (reads one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for file in weight_files(folder):
            with safe_open(file, "pt") as handle:
                out.update({k: file for k in handle.keys()})  # noqa: SIM118 - safe_open is not iterable
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return f"different tensor sets ({len(ia)} vs {len(ib)})"
    differing = 0
    for name in ia:
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            if not fa.get_tensor(name).view(torch.int16).equal(fb.get_tensor(name).view(torch.int16)):
                differing += 1
    return "identical bits" if differing == 0 else f"{differing} of {len(ia)} tensors differ in some bits"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, help="override the number of layers (e.g. 4 for the 8b shape)")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "_work")
    parser.add_argument("--mergekit-python", help="python of a venv with mergekit installed")
    parser.add_argument("--residuals-python", help="python of a venv with the PyPI residuals package")
    parser.add_argument("--repeat", type=int, default=1, help="runs of hf-residual (best is reported)")
    parser.add_argument(
        "--env-variant",
        action="append",
        default=[],
        help="(repeatable) KEY=VALUE: also run this tree with that environment variable, alternately "
        "(e.g. HF_RESIDUAL_PREFETCH_MB=0)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the family's input files from the page cache before every run and floor read "
        "(posix_fadvise DONTNEED on those files only)",
    )
    parser.add_argument(
        "--baseline-src",
        action="append",
        default=[],
        help="(repeatable) a src/ folder of another hf-residual version (e.g. `git archive REV src | tar -x -C /tmp/old`, "
        "then /tmp/old/src), run alternately with this one, so both are measured under the same load",
    )
    args = parser.parse_args(argv)

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    family = args.workdir / f"{args.shape}-l{shape['num_hidden_layers']}"
    build_family(family, shape)
    base, instruct, cpt = family / "base", family / "instruct", family / "cpt"
    inputs = weight_files(base) + weight_files(instruct) + weight_files(cpt)
    in_bytes = sum(f.stat().st_size for f in inputs)
    out_bytes = folder_bytes(cpt)
    params = out_bytes / 2
    print(
        f"family {args.shape}: {params / 1e9:.2f}B parameters, inputs {in_bytes / 1e9:.2f} GB, "
        f"output {out_bytes / 1e9:.2f} GB",
        flush=True,
    )

    read_all(inputs)  # warm the page cache
    outputs = Path(tempfile.mkdtemp(prefix="port-speed-", dir=args.workdir))
    reads = [] if args.cold else [read_all(inputs) for _ in range(2)]
    writes = [write_bytes(outputs, out_bytes) for _ in range(2)]
    durable: list[float] = []
    direct: list[float] = []
    direct_back: list[float] = []

    hf_out = outputs / "hf-residual"
    # (label, extra environment): this tree, then --baseline-src and --env-variant, alternating run by run
    variants: list[tuple[str, dict]] = [("hf-residual port", {})]
    for src in args.baseline_src:
        variants.append((f"hf-residual port, {src}", {"PYTHONPATH": str(Path(src).absolute())}))
    for assignment in args.env_variant:
        key, _, value = assignment.partition("=")
        variants.append((f"hf-residual port, {assignment}", {key: value}))
    runs: dict[str, list[tuple[float, float, str, float]]] = {label: [] for label, _ in variants}
    cold = inputs if args.cold else []
    print(f"load average before: {load_average()}", flush=True)
    for _ in range(args.repeat):
        evict(cold)
        reads.append(read_all(inputs))  # the floor is measured between the runs too, under the same load
        writes.append(write_bytes(outputs, out_bytes))
        durable.append(write_bytes(outputs, out_bytes, fsync=True))
        direct.append(write_direct(outputs, out_bytes, read_back=False))
        direct_back.append(write_direct(outputs, out_bytes, read_back=True))
        for label, extra in variants:
            shutil.rmtree(hf_out, ignore_errors=True)  # deleting the last output is not part of the run
            env = {**os.environ, **extra}
            evict(cold)
            command = [sys.executable, "-m", "hf_residual.cli", "port", str(instruct), "--base", str(base)]
            runs[label].append(timed([*command, "--to", str(cpt), "-o", str(hf_out), "-q"], env=env))
    print(f"load average after: {load_average()}", flush=True)
    read_s, write_s = min(reads), min(writes)
    floor = read_s + write_s
    rows = [("I/O floor (read inputs + write output)", floor, None)]
    if durable:
        rows.append(("I/O floor, output fsynced (durable)", read_s + min(durable), None))
        rows.append(("I/O floor, output O_DIRECT (durable)", read_s + min(direct), None))
        rows.append(("I/O floor, O_DIRECT + read back", read_s + min(direct_back), None))
    for label, _ in variants:
        best = min(runs[label])
        rows.append((label, best[0], best[1]))
        walls = sorted(run[0] for run in runs[label])
        cpus = sorted(run[3] for run in runs[label])
        print(
            f"{label}: wall {' '.join(f'{w:.2f}' for w in walls)} s (median {walls[len(walls) // 2]:.2f}); "
            f"CPU user+sys {' '.join(f'{c:.2f}' for c in cpus)} s"
        )

    notes = []
    if args.mergekit_python:
        config = outputs / "mergekit.yml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
            f"  - model: {cpt}\n    parameters:\n      weight: 1.0\n"
            f"  - model: {instruct}\n    parameters:\n      weight: 1.0\n"
        )
        mergekit_yaml = str(Path(args.mergekit_python).parent / "mergekit-yaml")
        mk_out = outputs / "mergekit"
        try:
            wall, rss, *_ = timed([mergekit_yaml, str(config), str(mk_out)])
            rows.append(("mergekit task_arithmetic", wall, rss))
            notes.append(f"hf-residual vs mergekit output: {compare_outputs(hf_out, mk_out)}")
        except RuntimeError as error:
            notes.append(f"mergekit failed: {str(error)[-400:]}")
    if args.residuals_python:
        # bfloat16 loading: its float32 default holds three float32 models plus the residual (~20 GB at 1.2B).
        script = (
            "import sys, torch\nfrom residuals import Residuals\n"
            "r = Residuals.from_models(base_model=sys.argv[1], instruct_model=sys.argv[2], dtype=torch.bfloat16)\n"
            "r.apply(base_model=sys.argv[3], out_dir=sys.argv[4], model_dtype=torch.bfloat16)\n"
        )
        try:
            wall, rss, *_ = timed(
                [
                    args.residuals_python,
                    "-c",
                    script,
                    str(base),
                    str(instruct),
                    str(cpt),
                    str(outputs / "residuals"),
                ]
            )
            rows.append(("PyPI residuals (from_models + apply)", wall, rss))
        except RuntimeError as error:
            notes.append(f"residuals package failed: {str(error)[-400:]}")

    total_gb = (in_bytes + out_bytes) / 1e9
    print(f"\nI/O floor: read {read_s:.2f} s + write {write_s:.2f} s = {floor:.2f} s")
    print(
        f"{'tool':40} {'wall s':>8} {'peak RSS GiB':>13} {'GB/s in+out':>12} {'x floor':>8} {'x hf-residual':>14}"
    )
    hf_wall = next(wall for name, wall, _ in rows if name == "hf-residual port")
    for name, wall, rss in rows:
        rss_text = f"{rss:.2f}" if rss is not None else "-"
        print(
            f"{name:40} {wall:8.2f} {rss_text:>13} {total_gb / wall:12.2f} {wall / floor:8.2f} "
            f"{wall / hf_wall:14.2f}"
        )
    floors = {name: wall for name, wall, _ in rows if name.startswith("I/O floor")}
    if len(floors) > 1:
        print(
            "\nhf-residual against the floor that does the same I/O (its output made durable the same way):"
        )
        for label, extra in variants:
            floor_name = same_work_floor({**os.environ, **extra})
            wall = next(wall for name, wall, _ in rows if name == label)
            print(f"  {label:48} {wall:6.2f} s = {wall / floors[floor_name]:5.2f}x '{floor_name}'")
    for note in notes:
        print(note)
    shutil.rmtree(outputs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
