"""The engine's helper threads and files: the writer (write, read back, sha256), the input hasher.

``Writer`` writes blocks to the open shard and compares each one read back; ``Hasher`` checks the sha256
of inputs that carry one (a residual's, from its manifest) beside the arithmetic; ``Files`` holds the
input descriptors. ``engine.execute`` drives them through queues.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np

from hf_residual.core.jobs import Source, TensorJob
from hf_residual.core.safetensors_io import OutputTensor, TensorInfo, read_header
from hf_residual.core.shard_files import DIRECT_CHUNK, AlignedBuffer, BufferedShard, DirectShard
from hf_residual.errors import VerificationError


class Writer(threading.Thread):
    """Writes blocks to the open shard and reads each one back to compare it with what was meant.

    Runs beside the arithmetic: writes, reads, comparisons and sha256 release the GIL, so this uses the
    second core. Where the filesystem allows it, a shard is written with ``O_DIRECT`` (``DirectShard``):
    the bytes go from an aligned buffer straight to the disk, are read back from the disk and compared, and
    the fsync before publishing has nothing left to write. Elsewhere (tmpfs, other systems, or
    ``HF_RESIDUAL_DIRECT_IO=0``) writes go through the page cache and each block is read back from it
    (``BufferedShard``). sha256 is computed only when a manifest needs it (``checksum="sha256"``). The
    header is re-parsed when the shard is closed.
    """

    DIRECT_IO = os.environ.get("HF_RESIDUAL_DIRECT_IO", "1") != "0"

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
        self._shard: BufferedShard | DirectShard | None = None
        self._readback = np.empty(block_bytes, np.uint8)
        self._chunks: tuple[AlignedBuffer, AlignedBuffer] | None = None  # DirectShard's, reused

    def run(self) -> None:
        try:
            self._loop()
        finally:  # "end" after an abort mid-shard, or an error: no descriptor outlives the run
            self._close_files()

    def _close_files(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.close()

    def _open(self, path: Path) -> BufferedShard | DirectShard:
        if self.DIRECT_IO:
            if self._chunks is None:
                self._chunks = (AlignedBuffer(DIRECT_CHUNK), AlignedBuffer(DIRECT_CHUNK))
            shard = DirectShard.open(path, *self._chunks)
            if shard is not None:
                return shard
        return BufferedShard(path, self._readback)

    def _loop(self) -> None:
        hasher = None
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
                    self._shard = self._open(path)
                    self._shard.write(memoryview(header), "the header")
                elif kind == "tensor":
                    current = payload
                    hasher = hashlib.sha256() if self.checksum == "sha256" else None
                elif kind == "data":
                    buffer, nbytes = payload
                    view = memoryview(buffer)[:nbytes]
                    self._shard.write(view, repr(current.name))
                    if hasher is not None:
                        hasher.update(view)
                    self.free.put(buffer)
                elif kind == "end_tensor":
                    self.hashes[current.name] = hasher.hexdigest() if hasher is not None else ""
                elif kind == "close":
                    path, expected = payload
                    shard, self._shard = self._shard, None
                    try:
                        shard.finish()
                    finally:
                        shard.close()
                    verify_header(path, expected)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
                if kind == "data":
                    self.free.put(payload[0])
                with contextlib.suppress(OSError):  # the first error is the one to report
                    self._close_files()


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
