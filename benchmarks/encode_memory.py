"""Peak memory of ``hf-residual extract --codec``: the whole-tensor encoders against the streamed ones.

Each codec is run twice, side by side in one run, as separate processes of the installed
``hf_residual`` (``hf-residual extract INSTRUCT --base BASE -o OUT --codec SPEC``):

- whole: every tensor computed whole in float32 and encoded from it (the encoders before
  ``codecs.encode_stream``; forced here by making ``encode_stream.streams`` refuse every codec);
- streamed: the default (dense, bitdelta and DARE tensors in chunks; lowrank and top-k whole).

Prints wall seconds, peak RSS (the process's ``ru_maxrss``) and whether the two outputs are byte for byte
the same (every file of the folders). The default family is ``benchmarks/_work/1.1b-l4`` (TinyLlama's
shapes, 4 layers: a 32000 x 2048 embedding and LM head, 262 MB each in float32)::

    nice -n 19 python benchmarks/encode_memory.py --family benchmarks/_work/1.1b-l4
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNER = """
import sys
from hf_residual.codecs import encode_stream
if sys.argv[1] == "whole":
    encode_stream.streams = lambda codec: False
from hf_residual.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run(mode: str, family: Path, out: Path, spec: str) -> tuple[float, float]:
    """One extract in its own process; returns (wall seconds, peak RSS in GiB)."""
    argv = [
        sys.executable,
        "-c",
        RUNNER,
        mode,
        "extract",
        str(family / "instruct"),
        "--base",
        str(family / "base"),
    ]
    argv += ["-o", str(out), "--codec", spec, "--quiet"]
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} extract --codec {spec} failed")
    return wall, usage.ru_maxrss / 2**20  # kilobytes on Linux


def same_files(a: Path, b: Path) -> bool:
    """Compared in small reads: this process stays far smaller than the extracts it measures (a child's
    ``ru_maxrss`` starts from its parent's at the fork)."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=Path("benchmarks/_work/1.1b-l4"))
    parser.add_argument(
        "--codecs",
        default="bitdelta;bitdelta,scale=row,embeddings=compress;sparse:0.1",
        help="';'-separated specs",
    )
    args = parser.parse_args()
    print(f"family {args.family}")
    print(f"{'codec':42} {'whole s':>8} {'GiB':>6} {'streamed s':>10} {'GiB':>6}  same bytes")
    with tempfile.TemporaryDirectory(dir=args.family.parent) as work:
        for spec in args.codecs.split(";"):
            outs = {mode: Path(work) / mode for mode in ("whole", "streamed")}
            figures = {mode: run(mode, args.family, out, spec) for mode, out in outs.items()}
            same = same_files(outs["whole"], outs["streamed"])
            (tw, mw), (ts, ms) = figures["whole"], figures["streamed"]
            print(f"{spec:42} {tw:8.2f} {mw:6.2f} {ts:10.2f} {ms:6.2f}  {same}", flush=True)
            for out in outs.values():
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
