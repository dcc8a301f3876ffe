"""The engine's I/O shortcuts (issue 14 §5): each keeps the bits and the checks it replaces.

- the writer compares each block read back with one ``memcmp`` (``shard_files.same_bytes``);
- where the filesystem takes it, shards are written with ``O_DIRECT`` in aligned chunks, read back from
  the disk, the last chunk padded and the file cut to its size; elsewhere through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import matches, reference_folders

import hf_residual
from hf_residual.core import shard_files, writer
from hf_residual.errors import VerificationError


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 19])
def test_same_bytes_finds_any_one_differing_byte(size):
    rng = np.random.default_rng(size)
    a = rng.integers(0, 256, size, dtype=np.uint8)
    assert shard_files.same_bytes(a, a.copy())
    for at in {0, size // 2, size - 1}:
        b = a.copy()
        b[at] ^= 1 << (at % 8)
        assert not shard_files.same_bytes(a, b), at
    assert not shard_files.same_bytes(a, a[:-1].copy())
    assert shard_files.same_bytes(a[:0], a[:0].copy())


def _count_direct_shards(monkeypatch) -> list[Path]:
    """Paths of the shards ``DirectShard.open`` accepted (the real open, spied on)."""
    opened: list[Path] = []
    real = shard_files.DirectShard.open.__func__

    def spy(cls, path, *args):
        shard = real(cls, path, *args)
        if shard is not None:
            opened.append(Path(path))
        return shard

    monkeypatch.setattr(shard_files.DirectShard, "open", classmethod(spy))
    return opened


@pytest.mark.parametrize("direct", [True, False])
def test_port_writes_the_same_bits_with_and_without_o_direct(llama, tmp_path, monkeypatch, direct):
    """Sharded output (20 KB shards: every shard ends in a padded O_DIRECT chunk, then is cut to its size)
    equals the float32 reference bit for bit, written with ``O_DIRECT`` where the filesystem takes it."""
    monkeypatch.setattr(writer.Writer, "DIRECT_IO", direct)
    opened = _count_direct_shards(monkeypatch)
    out = tmp_path / "ported"
    hf_residual.port(
        llama.instruct, to=llama.cpt, base=llama.base, output=out, progress=False, max_shard_size="20KB"
    )
    assert matches(out, reference_folders(llama.cpt, llama.instruct, llama.base))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and any(f.stat().st_size % shard_files.DIRECT_ALIGN for f in shards)
    # a filesystem without O_DIRECT under the test folder would leave the direct path untested: said, not skipped
    assert len(opened) == (len(shards) if direct else 0), f"O_DIRECT refused under {tmp_path}"


def test_a_chunk_larger_than_one_o_direct_write_spans_tensors(tmp_path, monkeypatch):
    """Small chunks (3 alignment units) so tensors cross chunk boundaries and chunks hold several tensors."""
    monkeypatch.setattr(shard_files, "DIRECT_CHUNK", 3 * shard_files.DIRECT_ALIGN)
    chunk = shard_files.AlignedBuffer(3 * shard_files.DIRECT_ALIGN)
    back = shard_files.AlignedBuffer(3 * shard_files.DIRECT_ALIGN)
    path = tmp_path / "x.bin"
    shard = shard_files.DirectShard.open(path, chunk, back)
    assert shard is not None
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8)
    try:
        for start, stop in [(0, 7), (7, 20_000), (20_000, 20_001), (20_001, 50_000)]:
            shard.write(memoryview(data[start:stop]), f"t{start}")
        shard.finish()
    finally:
        shard.close()
    assert path.read_bytes() == data.tobytes()


def test_a_refused_o_direct_write_carries_on_through_the_page_cache(tmp_path):
    """A buffer the kernel refuses for O_DIRECT (misaligned: EINVAL, as on a filesystem wanting another
    alignment) makes the shard leave O_DIRECT and write the same bytes through the page cache."""

    class Misaligned:
        def __init__(self, nbytes: int) -> None:
            self.inner = shard_files.AlignedBuffer(nbytes + 4096)
            self.array = self.inner.array[1 : nbytes + 1]
            self.view = self.inner.view[1 : nbytes + 1]

    path = tmp_path / "x.bin"
    size = shard_files.DIRECT_CHUNK
    shard = shard_files.DirectShard.open(path, Misaligned(size), shard_files.AlignedBuffer(size))
    assert shard is not None and os.O_DIRECT & fcntl.fcntl(shard.fd, fcntl.F_GETFL)
    data = np.arange(size + 5000, dtype=np.uint64).view(np.uint8)[: size + 5000]
    try:
        shard.write(memoryview(data), "t")
        assert not os.O_DIRECT & fcntl.fcntl(shard.fd, fcntl.F_GETFL)
        shard.finish()
    finally:
        shard.close()
    assert path.read_bytes() == data.tobytes()


def test_a_filesystem_without_o_direct_gets_buffered_shards(llama, tmp_path, monkeypatch):
    """Test double: ``os.open`` refuses ``O_DIRECT`` with EINVAL, as filesystems without it do (this
    machine's disk and its tmpfs both take it). Every shard is then written buffered, same bits."""
    real_open = os.open

    def open_without_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    opened = _count_direct_shards(monkeypatch)
    monkeypatch.setattr(shard_files.os, "open", open_without_direct)
    out = tmp_path / "ported"
    hf_residual.port(
        llama.instruct, to=llama.cpt, base=llama.base, output=out, progress=False, max_shard_size="20KB"
    )
    assert matches(out, reference_folders(llama.cpt, llama.instruct, llama.base))
    assert opened == [] and len(list(out.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_that_read_back_different_are_refused_naming_the_tensor(tmp_path, monkeypatch, direct):
    """The file gets one byte changed (the bytes meant stay intact): the comparison catches it and names
    the tensor the byte belongs to, for both kinds of shard."""
    real = shard_files.write_all_at

    def damaging(fd, view, offset):  # file byte 30,000 (in 'second') reaches the file flipped
        damaged, at = np.frombuffer(view, np.uint8), 30_000 - offset
        if not 0 <= at < len(damaged):
            return real(fd, view, offset)
        damaged[at] ^= 0x01
        try:
            real(fd, view, offset)
        finally:
            damaged[at] ^= 0x01

    monkeypatch.setattr(shard_files, "write_all_at", damaging)
    path = tmp_path / "x.bin"
    if direct:
        size = shard_files.DIRECT_CHUNK
        shard = shard_files.DirectShard.open(
            path, shard_files.AlignedBuffer(size), shard_files.AlignedBuffer(size)
        )
    else:
        shard = shard_files.BufferedShard(path, np.empty(20_000, np.uint8))
    data = np.arange(40_000, dtype=np.uint8)
    try:
        with pytest.raises(VerificationError, match="bytes of 'second' read back differ"):
            shard.write(memoryview(data[:20_000]), "'first'")
            shard.write(memoryview(data[20_000:]), "'second'")
            shard.finish()
    finally:
        shard.close()


def test_verify_writes_off_reads_nothing_back_and_keeps_the_bits(llama, tmp_path, monkeypatch):
    """``HF_RESIDUAL_VERIFY_WRITES=0`` (the documented opt-out) skips the read-back, nothing else."""
    reads: list[int] = []
    real = shard_files.read_all_at

    def spy(fd, out, offset, what):
        reads.append(out.size)
        real(fd, out, offset, what)

    monkeypatch.setattr(shard_files, "read_all_at", spy)
    for verify in (True, False):
        monkeypatch.setattr(shard_files, "VERIFY_WRITES", verify)
        reads.clear()
        out = tmp_path / f"ported-{verify}"
        hf_residual.port(
            llama.instruct, to=llama.cpt, base=llama.base, output=out, progress=False, max_shard_size="20KB"
        )
        assert matches(out, reference_folders(llama.cpt, llama.instruct, llama.base))
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert (sum(reads) >= written) if verify else reads == []
