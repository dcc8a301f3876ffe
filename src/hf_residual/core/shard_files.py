"""Output shard files for the engine's writer: written through the page cache, or with ``O_DIRECT``.

Both read every byte back after writing it and compare it with what was meant (one ``memcmp``); the
``O_DIRECT`` kind reads it back from the disk. See ``writer.Writer`` for which one a shard gets.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hf_residual.errors import VerificationError

# Read every written byte back (from the disk with O_DIRECT) and compare it: on by default; "0" skips it
# (an O_DIRECT port then reads the output once less: 1.1B family 2.6 s vs 4.5 s, benchmarks/RESULTS.md).
VERIFY_WRITES = os.environ.get("HF_RESIDUAL_VERIFY_WRITES", "1") != "0"
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the logical block size
# Bytes per O_DIRECT write: 8 MB ran at the disk's speed here (benchmarks/RESULTS.md).
DIRECT_CHUNK = int(os.environ.get("HF_RESIDUAL_DIRECT_CHUNK_MB", "8")) << 20


class AlignedBuffer:
    """A page-aligned byte buffer (anonymous ``mmap``), as ``O_DIRECT`` reads and writes need."""

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, nbytes)
        self.array = np.frombuffer(self.map, np.uint8)
        self.view = memoryview(self.map)


def open_pair(path: Path, flag: int = 0) -> tuple[int, int]:
    """A descriptor writing ``path`` (created or emptied) and one reading it back, both opened with ``flag``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
    try:
        return fd, os.open(path, os.O_RDONLY | flag)
    except BaseException:
        os.close(fd)
        raise


class ShardFile:
    """The two descriptors of a shard being written: ``fd`` writes, ``read_fd`` reads back."""

    def __init__(self, fd: int, read_fd: int) -> None:
        self.fd, self.read_fd = fd, read_fd

    def close(self) -> None:
        fd, read_fd, self.fd, self.read_fd = self.fd, self.read_fd, -1, -1
        try:
            if fd >= 0:
                os.close(fd)
        finally:
            if read_fd >= 0:
                os.close(read_fd)


def differ(what: str) -> VerificationError:
    return VerificationError(f"bytes of {what} read back differ from those written")


class BufferedShard(ShardFile):
    """A shard written through the page cache; each block is read back from it right away and compared."""

    def __init__(self, path: Path, readback: np.ndarray) -> None:
        super().__init__(*open_pair(path))
        self.readback = readback
        self.cursor = 0

    def write(self, view: memoryview, what: str) -> None:
        write_all_at(self.fd, view, self.cursor)
        # a header larger than the read-back buffer is not compared here: it is re-parsed at close
        if VERIFY_WRITES and len(view) <= self.readback.size:
            back = self.readback[: len(view)]
            read_all_at(self.read_fd, back, self.cursor, what)
            if not same_bytes(back, np.frombuffer(view, np.uint8)):
                raise differ(what)
        self.cursor += len(view)

    def finish(self) -> None:
        """Nothing is pending: every block was written and compared as it came."""


class DirectShard(ShardFile):
    """A shard written with ``O_DIRECT``: bytes gathered in an aligned chunk, written, read back from the disk.

    Blocks and the header are copied into ``chunk``; each full chunk is written at its (aligned) offset,
    read back from the disk into ``back`` and compared, so what is compared is what the disk holds, not a
    page-cache copy. The last chunk is padded to the alignment and the file then truncated to its size.
    This skips the page cache: no dirty pages for the fsync to write later, no memory pressure from a
    model-sized output (benchmarks/RESULTS.md). If a write is refused (``EINVAL``: the filesystem wants
    another alignment), the shard carries on through the page cache, same bytes, same checks.
    """

    def __init__(self, fd: int, read_fd: int, chunk: AlignedBuffer, back: AlignedBuffer) -> None:
        super().__init__(fd, read_fd)
        self.chunk, self.back = chunk, back
        self.fill = 0  # bytes of ``chunk`` in use
        self.offset = 0  # file offset of ``chunk``'s first byte
        self.spans: list[tuple[int, str]] = []  # (start in chunk, what): names a differing block

    @classmethod
    def open(cls, path: Path, chunk: AlignedBuffer, back: AlignedBuffer) -> DirectShard | None:
        """The shard opened for ``O_DIRECT``, or None where the filesystem or system does not offer it."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:  # pragma: no cover - not Linux
            return None
        try:
            return cls(*open_pair(path, flag), chunk, back)
        except OSError as error:
            if error.errno == errno.EINVAL:  # a filesystem without O_DIRECT
                return None
            raise

    def write(self, view: memoryview, what: str) -> None:
        done = 0
        while done < len(view):
            take = min(len(view) - done, DIRECT_CHUNK - self.fill)
            if not self.spans or self.spans[-1][1] != what:
                self.spans.append((self.fill, what))
            self.chunk.array[self.fill : self.fill + take] = np.frombuffer(view[done : done + take], np.uint8)
            self.fill += take
            done += take
            if self.fill == DIRECT_CHUNK:
                self._flush()

    def finish(self) -> None:
        """Write the last, padded chunk and cut the file to its size."""
        size = self.offset + self.fill
        if self.fill:
            self._flush()
        os.ftruncate(self.fd, size)

    def _flush(self) -> None:
        nbytes = -(-self.fill // DIRECT_ALIGN) * DIRECT_ALIGN
        self.chunk.array[self.fill : nbytes] = 0
        self._direct_or_buffered(write_all_at, self.fd, self.chunk.view[:nbytes], self.offset)
        if VERIFY_WRITES:
            back, meant = self.back.array[:nbytes], self.chunk.array[: self.fill]
            self._direct_or_buffered(read_all_at, self.read_fd, back, self.offset, self.spans[0][1])
            if not same_bytes(back[: self.fill], meant):
                first = int(np.flatnonzero(back[: self.fill] != meant)[0])
                raise differ([name for start, name in self.spans if start <= first][-1])
        self.offset += self.fill
        self.fill = 0
        self.spans = []

    def _direct_or_buffered(self, io: Callable, *args) -> None:
        """``io(*args)``; if the kernel refuses it for O_DIRECT (EINVAL), leave O_DIRECT and do it again."""
        try:
            io(*args)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            import fcntl  # POSIX only, and only needed here

            for fd in (self.fd, self.read_fd):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            io(*args)


def read_all_at(fd: int, out: np.ndarray, offset: int, what: str) -> None:
    """Fill ``out`` from ``fd`` at ``offset``; a file that ends first is a verification error."""
    done = 0
    while done < out.size:
        got = os.preadv(fd, [memoryview(out)[done:]], offset + done)
        if got <= 0:
            raise VerificationError(f"file ends inside {what} when read back")
        done += got


@functools.cache
def _libc_function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """A C library function (ctypes releases the GIL while it runs), or None where it is missing."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` (contiguous uint8, same size) hold the same bytes: one ``memcmp``, no temporary.

    ``np.array_equal`` makes a boolean array and reduces it: about 2.5x the time (benchmarks/RESULTS.md).
    """
    if a.size != b.size:
        return False
    memcmp = _libc_function("memcmp", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t))
    if memcmp is None or not (a.flags.c_contiguous and b.flags.c_contiguous):  # pragma: no cover
        return bool(np.array_equal(a, b))
    return a.size == 0 or memcmp(a.ctypes.data, b.ctypes.data, a.size) == 0


def write_all_at(fd: int, view: memoryview, offset: int) -> None:
    """Write every byte of ``view`` at ``offset`` (a write may write fewer bytes than asked)."""
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
