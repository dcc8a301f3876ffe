"""How to write a model-sized output durably: plain writes then fsync, vs starting writeback as you go.

The engine's writer writes 512 KB blocks and the output is fsynced before it is published. This writes
``--gb`` GB the same way, alternating the ways, each preceded by ``sync``:

- ``plain``: write everything, then fsync;
- ``writeback``: ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` every 64 MB written, then fsync (tried in
  ``core.writer``, measured slower end to end, removed);
- ``fallocate``: the same with the file's size reserved first (``posix_fallocate``);
- ``direct``: ``O_DIRECT`` writes (no page cache; the data is on the disk when each write returns): what
  ``core.shard_files.DirectShard`` does, in 8 MB chunks, each also read back from the disk.

Usage::

    python benchmarks/write_paths.py --gb 2.2 --repeat 2 --dir benchmarks/_work
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import time
from pathlib import Path

CHUNK = 1 << 19  # the engine's block of 2^18 bfloat16 values
FLUSH = 64 << 20


def write(path: Path, nbytes: int, mode: str) -> tuple[float, float]:
    """(seconds writing, seconds in the final fsync)."""
    sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(CHUNK))
    os.sync()
    time.sleep(0.5)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
    started = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        if mode == "fallocate":
            os.posix_fallocate(fd, 0, nbytes)
        done = flushed = 0
        while done < nbytes:
            done += os.write(fd, buffer)
            if mode in ("writeback", "fallocate") and done - flushed >= FLUSH:
                sync_file_range(fd, flushed, done - flushed, 2)  # SYNC_FILE_RANGE_WRITE
                flushed = done
        written = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return written - started, time.perf_counter() - written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=2.2, help="output size in GB (the 1.1B family: 2.2)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of all modes, alternating")
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent / "_work", help="where to write")
    parser.add_argument(
        "--modes", default="plain,writeback,direct,fallocate", help="comma-separated, from those above"
    )
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    nbytes = int(args.gb * 1e9) // CHUNK * CHUNK
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for _ in range(args.repeat):
        for mode in args.modes.split(","):
            writing, fsync = write(args.dir / "write_paths.bin", nbytes, mode)
            print(
                f"{mode:10} write {writing:6.2f} s  fsync {fsync:5.2f} s  total {writing + fsync:6.2f} s",
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
