"""The engine's I/O shortcuts (issue 14 §5): each keeps the bits and the checks it replaces.

- the writer compares each block read back with one ``memcmp`` (``writer.same_bytes``);
- with ``Writer.FLUSH_BYTES`` set (off by default: measured slower), it asks the kernel to start writing
  the output to the disk as it goes (``writer.start_writeback``), before the fsync that makes it durable.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import matches, reference_folders

import hf_residual
from hf_residual.core import writer
from hf_residual.errors import VerificationError


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 19])
def test_same_bytes_finds_any_one_differing_byte(size):
    rng = np.random.default_rng(size)
    a = rng.integers(0, 256, size, dtype=np.uint8)
    assert writer.same_bytes(a, a.copy())
    for at in {0, size // 2, size - 1}:
        b = a.copy()
        b[at] ^= 1 << (at % 8)
        assert not writer.same_bytes(a, b), at
    assert not writer.same_bytes(a, a[:-1].copy())
    assert writer.same_bytes(a[:0], a[:0].copy())


def test_writeback_is_started_in_order_as_the_port_writes(llama, tmp_path, monkeypatch):
    """Off by default; with a small FLUSH_BYTES, writeback is requested for consecutive ranges that tile each shard from its
    start; the output is still the float32 reference bit for bit."""
    calls: list[tuple[int, int, int]] = []
    real = writer.start_writeback

    def spy(fd: int, offset: int, nbytes: int) -> None:
        calls.append((os.fstat(fd).st_ino, offset, nbytes))
        real(fd, offset, nbytes)  # the real sync_file_range, on the real file

    assert writer.Writer.FLUSH_BYTES == 0 or "HF_RESIDUAL_WRITEBACK_MB" in os.environ
    monkeypatch.setattr(writer, "start_writeback", spy)
    monkeypatch.setattr(writer.Writer, "FLUSH_BYTES", 4096)
    out = tmp_path / "ported"
    hf_residual.port(
        llama.instruct, to=llama.cpt, base=llama.base, output=out, progress=False, max_shard_size="20KB"
    )
    assert matches(out, reference_folders(llama.cpt, llama.instruct, llama.base))
    shards = {f.stat().st_ino: f.stat().st_size for f in out.glob("*.safetensors")}
    assert len(shards) > 1  # the fixture is sharded: each shard starts at 0
    for inode, size in shards.items():
        ranges = [(offset, nbytes) for ino, offset, nbytes in calls if ino == inode]
        assert ranges and ranges[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        assert all(n >= 4096 for _, n in ranges) and ranges[-1][0] + ranges[-1][1] <= size


def test_a_block_that_reads_back_different_is_refused(tmp_path, monkeypatch):
    """The memcmp comparison still catches a block that differs when read back."""
    from hf_residual.core.safetensors_io import OutputTensor

    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 64)
    w = writer.Writer(buffers=1, block_bytes=64, checksum=None)
    fd = os.open(path, os.O_RDONLY)
    try:
        written = np.arange(64, dtype=np.uint8)
        with pytest.raises(VerificationError, match="read back differ"):
            w._verify_block(fd, 0, written, OutputTensor("t", "U8", (64,)))
        path.write_bytes(written.tobytes())
        w._verify_block(fd, 0, written, OutputTensor("t", "U8", (64,)))
    finally:
        os.close(fd)
