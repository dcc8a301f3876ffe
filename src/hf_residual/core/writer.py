"""The engine's helper threads and files: the writer (write, read back, sha256), the input hasher.

``Writer`` writes blocks to the open shard and compares each one read back; ``Hasher`` checks the sha256
of inputs that carry one (a residual's, from its manifest) beside the arithmetic; ``Files`` holds the
input descriptors. ``engine.execute`` drives them through queues.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import queue
import sys
import threading
from pathlib import Path

import numpy as np

from hf_residual.core.jobs import Source, TensorJob
from hf_residual.core.safetensors_io import OutputTensor, TensorInfo, read_header
from hf_residual.errors import VerificationError


class Writer(threading.Thread):
    """Writes blocks to the open shard and reads each one back to compare it with what was meant.

    Runs beside the arithmetic: writes, reads, comparisons and sha256 release the GIL, so this uses the
    second core. Each block is read back (from the page cache) right after it is written and compared
    byte for byte while it is still in memory, which costs less than checksumming every tensor twice;
    sha256 is computed only when a manifest needs it (``checksum="sha256"``). The header is re-parsed
    when the shard is closed.

    With ``FLUSH_BYTES`` > 0, the kernel is asked to start writing each ``FLUSH_BYTES`` written to the
    disk (Linux ``sync_file_range``, asynchronous) ahead of the fsync before publishing. Off by default:
    on the 1.1B family it cost CPU in this thread and made the port slower (benchmarks/RESULTS.md);
    ``HF_RESIDUAL_WRITEBACK_MB`` sets it for benchmarks.
    """

    FLUSH_BYTES = int(os.environ.get("HF_RESIDUAL_WRITEBACK_MB", "0")) << 20

    def __init__(self, buffers: int, block_bytes: int, checksum: str | None):
        super().__init__(daemon=True, name="hf-residual-writer")
        self.checksum = checksum
        self.block_bytes = block_bytes
        self.tasks: queue.Queue = queue.Queue(maxsize=buffers)
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(np.empty(block_bytes, np.uint8))
        self.hashes: dict[str, str] = {}
        self.error: BaseException | None = None
        self._readback = np.empty(block_bytes, np.uint8)
        # The open shard: written through ``_handle``, read back through ``_read_fd``.
        self._handle = None
        self._read_fd = -1
        self._flushed = 0  # bytes of the open shard handed to start_writeback so far

    def run(self) -> None:
        try:
            self._loop()
        finally:  # "end" after an abort mid-shard, or an error: no descriptor outlives the run
            self._close_files()

    def _close_files(self) -> None:
        handle, read_fd = self._handle, self._read_fd
        self._handle, self._read_fd = None, -1
        try:
            if handle is not None:
                handle.close()
        finally:
            if read_fd >= 0:
                os.close(read_fd)

    def _loop(self) -> None:
        hasher = None
        cursor = 0
        current: OutputTensor | None = None
        while True:
            kind, payload = self.tasks.get()
            if kind == "end":
                return
            if self.error is not None:
                if kind == "data":
                    self.free.put(payload[0])
                continue
            try:
                if kind == "open":
                    path, header = payload
                    self._handle = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by _close_files
                    self._read_fd = os.open(path, os.O_RDONLY)
                    write_all(self._handle, memoryview(header))
                    cursor = len(header)
                    self._flushed = 0
                elif kind == "tensor":
                    current = payload
                    hasher = hashlib.sha256() if self.checksum == "sha256" else None
                elif kind == "data":
                    buffer, nbytes = payload
                    view = memoryview(buffer)[:nbytes]
                    write_all(self._handle, view)
                    self._verify_block(self._read_fd, cursor, buffer[:nbytes], current)
                    if hasher is not None:
                        hasher.update(view)
                    cursor += nbytes
                    self.free.put(buffer)
                    if 0 < self.FLUSH_BYTES <= cursor - self._flushed:
                        start_writeback(self._handle.fileno(), self._flushed, cursor - self._flushed)
                        self._flushed = cursor
                elif kind == "end_tensor":
                    self.hashes[current.name] = hasher.hexdigest() if hasher is not None else ""
                elif kind == "close":
                    path, expected = payload
                    self._close_files()
                    verify_header(path, expected)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
                if kind == "data":
                    self.free.put(payload[0])
                with contextlib.suppress(OSError):  # the first error is the one to report
                    self._close_files()

    def _verify_block(self, fd: int, offset: int, written: np.ndarray, tensor: OutputTensor) -> None:
        back = self._readback[: written.size]
        done = 0
        while done < written.size:
            got = os.preadv(fd, [memoryview(back)[done:]], offset + done)
            if got <= 0:
                raise VerificationError(f"file ends inside tensor {tensor.name!r} when read back")
            done += got
        if not same_bytes(back, written):
            raise VerificationError(f"bytes of {tensor.name!r} read back differ from those written")


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


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to the disk, without waiting.

    Only an early start: durability still comes from the fsync before the output is published. Where
    ``sync_file_range`` is missing (not Linux) or fails, nothing happens.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    function = _libc_function(
        "sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    )
    if function is not None:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # an error here is not one: fsync decides


def write_all(handle, view: memoryview) -> None:
    """Write every byte (an unbuffered write may write fewer than asked)."""
    written = 0
    while written < len(view):
        written += handle.write(view[written:])


def verify_header(path: Path, expected: list[OutputTensor]) -> None:
    """Re-parse a closed shard's header: names, order, shapes, dtypes and size must match the plan."""
    tensors, _ = read_header(path)
    if list(tensors) != [t.name for t in expected] or any(
        tensors[t.name].shape != t.shape or tensors[t.name].dtype != t.dtype for t in expected
    ):
        raise VerificationError(f"{path}: header read back differs from what was planned")
    last = tensors[expected[-1].name] if expected else None
    if last is not None and last.offset + last.nbytes != path.stat().st_size:
        raise VerificationError(f"{path}: file size differs from what was planned")


class Files:
    """Open file descriptors of input shards, shared by all jobs."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Hasher(threading.Thread):
    """Hashes input blocks (a residual's, against its manifest) beside the arithmetic and the writer.

    sha256 runs at about the speed of the whole apply pipeline, so done inline it would roughly double
    the time; here it overlaps with the kernels (hashlib releases the GIL). Blocks arrive in a pool
    buffer (the fused path reads straight into one; other paths copy), are hashed in order, and the
    buffer goes back to the pool. A tensor's digest is compared when its "check" arrives; the engine
    waits for all checks (``drain``) before it closes a shard, so a damaged residual never reaches a
    closed shard.
    """

    def __init__(self, buffers: int, block_bytes: int):
        super().__init__(daemon=True, name="hf-residual-hasher")
        self.tasks: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(np.empty(block_bytes, np.uint8))
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            kind, payload = self.tasks.get()
            try:
                if kind == "end":
                    return
                if kind == "data":
                    digest, buffer, nbytes = payload
                    try:
                        if self.error is None:
                            digest.update(memoryview(buffer)[:nbytes])
                    finally:
                        self.free.put(buffer)
                elif kind == "check" and self.error is None:
                    info, digest, done, expected = payload
                    if done != info.numel or digest.hexdigest() != expected:
                        self.error = VerificationError(
                            f"tensor {info.name!r} in {info.file} does not match the sha256 recorded for it "
                            f"in {info.file.parent}'s manifest: the residual is damaged (its data was "
                            "altered or corrupted after it was written). Nothing was written; re-download "
                            "the residual, or re-extract it from the instruct and base models"
                        )
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = self.error or error
            finally:
                self.tasks.task_done()

    def drain(self) -> None:
        """Wait until every block and check handed over is done; raise the first error."""
        self.tasks.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.tasks.put(("end", None))
        self.join()


class InputDigests:
    """sha256 of the input tensors whose ``Source`` carries an expected digest, fed as blocks are read.

    A tensor's blocks are read in order, possibly over two segments (a residual's rows, then its absolute
    rows), so one running hash per input tensor sees every byte once, as read and before any arithmetic
    touches it. ``check`` (at the end of the tensor's job) hands the comparison to the hasher thread.
    """

    def __init__(self, job: TensorJob, hasher: Hasher | None) -> None:
        self.hasher = hasher
        # input tensor -> [running hash, next element expected, expected digest]
        self._states: dict[TensorInfo, list] = {}
        for segment in job.segments:
            for source in (segment.plus, segment.minus, segment.addend):
                if source is not None and source.sha256 is not None:
                    self._states.setdefault(source.info, [hashlib.sha256(), 0, source.sha256])

    def take(self) -> np.ndarray:
        """A pool buffer to read a block into; hand it back with ``feed(..., owned=buffer)``."""
        return self.hasher.free.get()

    def feed(self, source: Source, element: int, count: int, raw, owned: np.ndarray | None = None) -> None:
        """``raw``: the stored bytes of ``source.info``'s elements ``element:element+count``.

        ``owned``: the pool buffer ``raw`` lies in (from ``take``), handed over without a copy; else the
        bytes are copied into a pool buffer, since the caller reuses or unmaps its own.
        """
        if source.sha256 is None:
            return
        state = self._states[source.info]
        if element != state[1]:  # pragma: no cover - plans read each checked tensor in order, once
            raise RuntimeError(f"{source.info.name!r} read out of order: element {element}, not {state[1]}")
        nbytes = count * source.info.itemsize
        if owned is None:
            owned = self.take()
            np.copyto(owned[:nbytes], np.frombuffer(raw, np.uint8, count=nbytes))
        self.hasher.tasks.put(("data", (state[0], owned, nbytes)))
        state[1] += count

    def check(self) -> None:
        for info, (digest, done, expected) in self._states.items():
            self.hasher.tasks.put(("check", (info, digest, done, expected)))
