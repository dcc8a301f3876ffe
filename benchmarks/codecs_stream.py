"""``python benchmarks/codecs.py --stream``: port from compressed residuals vs from a bfloat16 one, one run.

The family has Qwen2.5-1.5B's dimensions (hidden 1536, intermediate 8960, 28 layers, 12 heads, 2 KV
heads, vocabulary 151936, untied head: 1.78B parameters) in a Llama layout, written directly with numpy
(base ~ N(0, 0.02), instruct and cpt = base + N(0, 0.002) each, bfloat16). Three residuals are extracted
once: ``--dtype bfloat16``, ``--codec bitdelta`` and ``--codec lowrank:RANK``. The lowrank factors come
from a randomized SVD here (Halko et al., 2 power iterations), patched into the codec in the extracting
process only: an exact SVD of each 8960 x 1536 matrix takes about 5 s here (numpy's gesdd, quiet machine;
more under load), some 10 minutes for the family's matrices. The port
reads the same layout whatever produced the factors.

Each port runs as ``hf-residual port RESIDUAL --to CPT -o OUT -q`` under ``/usr/bin/time -v`` (wall time,
peak RSS), the three kinds interleaved ``--repeat`` times; a thread polls the output's parent folder and
the system's temporary directory and records the largest entry that is neither the output nor its
staging folder (the old behaviour: a float32 decoded copy, 2x the model). Load average is printed
before and after: the machine is shared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936)


def _tensors(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def build_family(root: Path, layers: int) -> None:
    """base, instruct, cpt as sharded bfloat16 safetensors with a Llama config (numpy only, one tensor
    at a time)."""
    from hf_residual.codecs.store import ShardWriter, to_bf16_bits

    if all((root / m / "config.json").is_file() for m in ("base", "instruct", "cpt")):
        return
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "vocab_size": SHAPE["vocab"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-6,
    }
    writers = {}
    for model in ("base", "instruct", "cpt"):
        (root / model).mkdir(parents=True)
        (root / model / "config.json").write_text(json.dumps(config, indent=1))
        writers[model] = ShardWriter(root / model, "model", 2 * 10**9)
    rng = np.random.default_rng(0)
    for name, shape in _tensors(layers).items():
        base = (
            np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * 0.02
        )
        writers["base"].add(name, "BF16", to_bf16_bits(base))
        for model in ("instruct", "cpt"):
            other = base + rng.standard_normal(shape, np.float32) * np.float32(0.002)
            writers[model].add(name, "BF16", to_bf16_bits(other))
    for writer in writers.values():
        writer.close()
    print(f"built the family in {time.perf_counter() - started:.0f} s", flush=True)


RANDOMIZED = r"""
import sys, numpy as np
exact_svd = np.linalg.svd
RANK = int(sys.argv[4])

def svd(matrix, full_matrices=False):  # randomized SVD of rank+10 columns, 2 power iterations
    k = min(min(matrix.shape), RANK + 10)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], k), np.float32))
    for _ in range(2):
        q, _ = np.linalg.qr(matrix @ (matrix.T @ q))
    u, s, vt = exact_svd(q.T @ matrix, full_matrices=False)
    return (q @ u).astype(np.float32), s.astype(np.float32), vt.astype(np.float32)

np.linalg.svd = svd  # only LowRank.encode calls it in this process
from hf_residual import api
api.extract(sys.argv[1], sys.argv[2], sys.argv[3], codec=f"lowrank:{RANK}", overwrite=True, progress=False)
"""


def extract_residuals(family: Path, rank: int) -> dict[str, Path]:
    from hf_residual import api

    out = {
        "bfloat16": family / "r-bfloat16",
        "bitdelta": family / "r-bitdelta",
        f"lowrank:{rank}": family / f"r-lowrank-{rank}",
    }
    base, instruct = family / "base", family / "instruct"
    for label, folder in out.items():
        if (folder / "residual.json").is_file():
            continue
        started = time.perf_counter()
        if label == "bfloat16":
            api.extract(instruct, base, folder, dtype="bfloat16", progress=False)
        elif label == "bitdelta":
            api.extract(instruct, base, folder, codec="bitdelta", progress=False)
        else:
            command = [sys.executable, "-c", RANDOMIZED, str(instruct), str(base), str(folder), str(rank)]
            subprocess.run(command, check=True)
        print(f"extracted {label} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


class Watch(threading.Thread):
    """The largest entry (bytes, recursively) that appears in ``folders`` besides the output."""

    def __init__(self, folders: list[Path], output: Path) -> None:
        super().__init__(daemon=True)
        self.folders, self.output = folders, output
        self.before = {f: set(os.listdir(f)) for f in folders}
        self.largest, self.largest_name, self.done = 0, "", threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for folder in self.folders:
                for name in set(os.listdir(folder)) - self.before[folder]:
                    if name == self.output.name or name.startswith(f".{self.output.name}.partial-"):
                        continue
                    size = _size(folder / name)
                    if size > self.largest:
                        self.largest, self.largest_name = size, name
            time.sleep(0.05)


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except FileNotFoundError:
        return 0


def timed_port(
    residual: Path, cpt: Path, output: Path, src: Path | None = None
) -> tuple[float, float, int, str, float]:
    """(wall s, peak RSS GiB, largest temporary entry in bytes, its name, user + system CPU s); ``src``:
    run hf_residual from that source folder instead (``--baseline-src``)."""
    shutil.rmtree(output, ignore_errors=True)
    os.sync()
    time.sleep(0.5)
    watch = Watch([output.parent, Path(tempfile.gettempdir())], output)
    watch.start()
    command = [sys.executable, "-m", "hf_residual.cli", "port", str(residual), "--to", str(cpt)]
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else None
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command, "-o", str(output), "-q"], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - started
    watch.done.set()
    watch.join()
    if done.returncode != 0:
        raise RuntimeError(f"port failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    cpu = sum(
        float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1))
        for kind in ("User", "System")
    )
    return wall, rss_kb / 1024**2, watch.largest, watch.largest_name, cpu


def run_stream(workdir: Path, rank: int, repeat: int, layers: int, baseline: Path | None = None) -> None:
    """``baseline``: a ``src`` folder of another version; its ports from the compressed residuals run
    interleaved with the others (rows labelled ``(baseline)``), for before/after figures in one run."""
    family = workdir / f"codecs-stream-1.5b-l{layers}"
    build_family(family, layers)
    residuals = extract_residuals(family, rank)
    cpt = family / "cpt"
    out_bytes = sum(p.stat().st_size for p in cpt.glob("*.safetensors"))
    sizes = {k: sum(p.stat().st_size for p in v.glob("residual*.safetensors")) for k, v in residuals.items()}
    outputs = family / "outputs"
    outputs.mkdir(exist_ok=True)
    for path in cpt.glob("*.safetensors"):  # warm the page cache
        path.read_bytes()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    kinds = [(label, folder, None) for label, folder in residuals.items()]
    if baseline is not None:
        kinds += [
            (f"{label} (baseline)", folder, baseline)
            for label, folder in residuals.items()
            if label != "bfloat16"
        ]
        sizes.update({label: sizes[label.split(" ")[0]] for label, _, _ in kinds})
    runs: dict[str, list] = {label: [] for label, _, _ in kinds}
    for _ in range(repeat):
        for label, folder, src in kinds:
            runs[label].append(timed_port(folder, cpt, outputs / "ported", src))
            wall, rss, _, _, cpu = runs[label][-1]
            print(f"  {label}: {wall:.2f} s, {rss:.2f} GiB, CPU {cpu:.2f} s", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    dense_min = min(r[0] for r in runs["bfloat16"])
    dense_median = statistics.median(r[0] for r in runs["bfloat16"])
    print(
        f"\nfamily: Qwen2.5-1.5B shape, {layers} layers, output {out_bytes / 1e9:.2f} GB (one shard up to "
        "5 GB)\n"
    )
    print("| port from | residual size | wall min | wall median | ratio to dense (min / median) | "
          "CPU (user + system) median | peak RSS | largest temporary entry |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, rows in runs.items():
        walls = [r[0] for r in rows]
        largest = max(rows, key=lambda r: r[2])
        temp = f"{largest[2] / 1e6:.1f} MB ({largest[3]})" if largest[2] else "none"
        print(
            f"| {label} | {sizes[label] / 1e9:.2f} GB | {min(walls):.2f} s | {statistics.median(walls):.2f} s | "
            f"{min(walls) / dense_min:.2f}x / {statistics.median(walls) / dense_median:.2f}x | "
            f"{statistics.median(r[4] for r in rows):.2f} s | {max(r[1] for r in rows):.2f} GiB | {temp} |"
        )
