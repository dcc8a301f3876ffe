"""Compressed residuals read in the stream: block decoders the engine reads like any input tensor.

``open_residual`` gives a compressed residual folder's tensors as ``core.jobs.DecodedInfo`` (float32
to the arithmetic), each with a block decoder of its codec that reads only the stored bytes a block
needs, with ``pread``: lowrank keeps ``A`` (rank x in) in memory and reads the rows of ``B`` a block
covers (``B[rows] @ A``, accumulated in float64, see ``lowrank.product``); bitdelta reads the packed sign
bytes of the range and its scales; sparse walks its gaps and values forward. Ranges may start and stop
mid-row (and mid-byte for signs). No decoded copy is written anywhere.

Integrity: a residual written by this version records a sha256 per stored part (``part_sha256``; a
dense tensor's ``stored_sha256``); each reader hashes every stored byte once as read (bytes it skipped
are read at the end) and ``finish`` refuses a mismatch before the output shard is closed. Dense tensors
then are ordinary sources, hashed by the engine. Older residuals record only the sha256 of each
decoded float32 tensor: bitdelta, sparse and dense tensors decode the same values block by block, so
their readers hash the decoded values in order; a lowrank tensor's recorded digest is of the float32
product ``B @ A`` of the whole matrix, so it is recomputed that way at the end (one tensor in memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_residual._version import __version__
from hf_residual.codecs import blas, registry
from hf_residual.codecs.parts import FIX, Part, PartReader, sha256_of  # noqa: F401 (re-exported)
from hf_residual.core import fused
from hf_residual.core.checkpoint import Checkpoint, open_checkpoint
from hf_residual.core.jobs import DecodedInfo, is_decoded
from hf_residual.core.manifest import CODECS, WEIGHTS_PREFIX, Manifest, TensorEntry, read_manifest
from hf_residual.core.safetensors_io import TensorInfo
from hf_residual.errors import ManifestError, NonFiniteError, VerificationError


@dataclass(frozen=True)
class Decoder:
    """One encoded tensor: its name, shape, stored parts, codec params, and the legacy float32 digest.

    ``legacy_sha256``: an older residual's digest of the decoded float32 tensor, checked when its parts
    have no digests of their own.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    parts: tuple[tuple[str, Part], ...]
    params: tuple[tuple[str, object], ...] = ()
    legacy_sha256: str | None = None

    def open(self, fd: Callable[[Path], int]) -> Reader:
        parts = {key: PartReader(part, fd(part.info.file)) for key, part in self.parts}
        return READERS[self.kind](self, parts)


class Reader:
    """Common to every codec's reader: decode-ahead, the legacy check, non-finite parts, ``finish``.

    Decode-ahead (readers with ``AHEAD``: lowrank, bitdelta): a worker thread decodes the span that
    follows the last one read (``span`` elements: the read's length, or more rows for lowrank) into a
    second buffer while the engine reads and combines the block's other inputs; reads inside a decoded
    span copy from it, any other read decodes its own range (``HF_RESIDUAL_DECODE_AHEAD=0``: never
    ahead). One decode at a time per reader, so its part readers still hash every stored byte once, in
    order.
    """

    AHEAD = False

    def __init__(self, decoder: Decoder, parts: dict[str, PartReader]) -> None:
        self.decoder, self.parts = decoder, parts
        self.cols = decoder.shape[-1] if len(decoder.shape) == 2 else max(1, int(np.prod(decoder.shape)))
        self.numel = int(np.prod(decoder.shape))
        self.legacy = hashlib.sha256() if decoder.legacy_sha256 else None
        self.next = 0  # legacy: the element the decoded-values digest expects next
        self.in_order = True
        self.decoded: tuple[int, int, np.ndarray] | None = None  # a span read ahead: (begin, end, values)
        self.ahead: tuple[int, int, np.ndarray, Future] | None = None  # the span being decoded ahead
        self.spare: list[np.ndarray] = []  # buffers for spans: two at most

    def read(self, start: int, count: int, out: np.ndarray) -> None:
        stop = start + count
        if not self._covers(self.decoded, start, stop) and self.ahead is not None:
            begin, end, values, decoding = self.ahead
            self.ahead = None
            decoding.result()  # its errors raise here
            self._release()
            self.decoded = (begin, end, values)
        if self._covers(self.decoded, start, stop):
            begin = self.decoded[0]
            np.copyto(out[:count], self.decoded[2][start - begin : stop - begin])
        else:
            self._release()
            self._read(start, count, out)
        if self.AHEAD and DECODE_AHEAD and self.ahead is None:
            following = self.decoded[1] if self.decoded is not None else stop
            if following < self.numel:
                end = min(self.numel, following + self.span(count))
                values = self._buffer(end - following)
                self.ahead = (
                    following,
                    end,
                    values,
                    _pool().submit(self._read, following, end - following, values),
                )
        if self.legacy is not None:
            if start == self.next and self.in_order:
                self.legacy.update(out[:count].tobytes())
                self.next += count
            else:  # not read once in order: the whole tensor is decoded again at the end
                self.in_order = False

    def span(self, count: int) -> int:
        """Elements to decode ahead after a read of ``count``."""
        return count

    @staticmethod
    def _covers(span: tuple[int, int, np.ndarray] | None, start: int, stop: int) -> bool:
        return span is not None and span[0] <= start and stop <= span[1]

    def _release(self) -> None:
        """The decoded span is done with: its buffer is reused."""
        if self.decoded is not None:
            values = self.decoded[2]
            self.spare.append(values if values.base is None else values.base)
            self.decoded = None

    def _buffer(self, size: int) -> np.ndarray:
        while self.spare:
            buffer = self.spare.pop()
            if buffer.size >= size:
                return buffer[:size]
        return np.empty(size, np.float32)

    def _wait(self) -> None:
        """Wait for a span being decoded ahead (end of the job): its errors raise here."""
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            ahead[3].result()

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def finite(self, values: np.ndarray, part: str) -> np.ndarray:
        if not np.isfinite(values).all():
            raise NonFiniteError(
                f"NaN or Inf in part {part!r} of tensor {self.decoder.name!r} of the compressed residual in "
                f"{self.parts[part].part.info.file.parent}: the residual is damaged; re-download it, or re-extract it"
            )
        return values

    def finish(self) -> None:
        self._wait()  # a span decoded ahead that no read took: its bytes were read in order
        for part in self.parts.values():
            part.check(self.decoder.name)
        if self.legacy is None:
            return
        if self.in_order and self.next == self.numel and self.decoder.kind != "lowrank":
            digest = self.legacy.hexdigest()
        else:
            digest = sha256_of(self.whole())
        if digest != self.decoder.legacy_sha256:
            raise VerificationError(
                f"tensor {self.decoder.name!r} of the compressed residual in "
                f"{next(iter(self.parts.values())).part.info.file.parent} decodes to values other than those "
                f"recorded when it was encoded (checksum differs): the files are damaged. {FIX}"
            )

    def whole(self) -> np.ndarray:
        """The whole tensor as an older version decoded it (the legacy digest's values)."""
        out = np.empty(int(np.prod(self.decoder.shape)), np.float32)
        self._read(0, out.size, out)
        return out


class DenseReader(Reader):
    """A tensor kept dense (bfloat16) in an older residual: its decoded values are what was hashed."""

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        out[:count] = self.parts["dense"].values(start, start + count)


class BitDeltaReader(Reader):
    """``scale * sign``: the sign bytes of the range (8 elements a byte), scales read once; decoded ahead."""

    AHEAD = True

    def __init__(self, decoder: Decoder, parts: dict[str, PartReader]) -> None:
        super().__init__(decoder, parts)
        scale = parts["scale"]
        self.scales = self.finite(scale.values(0, scale.part.info.numel), "scale")
        self.per_row = dict(decoder.params).get("scale") == "row"

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        first = start // 8
        packed = self.parts["signs"].read(first, (start + count + 7) // 8)
        if fused.AVAILABLE:  # one pass (``fused.signs_block``); the same values as the numpy passes below
            cols = self.cols if self.per_row else self.numel
            fused.signs_block(packed, start - first * 8, self.scales, start, cols, out[:count])
            return
        positive = np.unpackbits(packed)[start - first * 8 : start - first * 8 + count].view(bool)
        if self.per_row:
            row = start // self.cols
            rows = self.scales[row : (start + count - 1) // self.cols + 1]
            skip = start - row * self.cols
            scale = np.repeat(rows, self.cols)[skip : skip + count]
        else:
            scale = self.scales[0]
        np.copyto(out[:count], np.where(positive, scale, -scale))


class SparseReader(Reader):
    """Kept elements (flat index from the gaps, value) walked forward; a read before the cursor restarts."""

    CHUNK = 1 << 16

    def __init__(self, decoder: Decoder, parts: dict[str, PartReader]) -> None:
        super().__init__(decoder, parts)
        self.kept = parts["gaps"].part.info.numel
        self._restart()

    def _restart(self) -> None:
        self.loaded = 0  # entries [0, loaded) read from the files
        self.last = -1  # flat index of entry loaded - 1
        self.cursor = 0  # the previous read's stop: entries before it are dropped from the window
        self.index = np.empty(0, np.int64)  # window: flat indices and values of entries not yet passed
        self.vals = np.empty(0, np.float32)

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        stop = start + count
        if start < self.cursor:
            self._restart()  # a read before the cursor (never in the engine's order): walk again
        while self.last < stop - 1 and self.loaded < self.kept:
            end = min(self.kept, self.loaded + max(self.CHUNK, count))
            gaps = self.parts["gaps"].values(self.loaded, end).astype(np.int64)
            index = np.cumsum(gaps) + self.last
            vals = self.finite(self.parts["values"].values(self.loaded, end), "values")
            self.index = np.concatenate([self.index, index])
            self.vals = np.concatenate([self.vals, vals])
            self.loaded, self.last = end, int(index[-1])
        lo = int(np.searchsorted(self.index, start))
        hi = int(np.searchsorted(self.index, stop))
        target = out[:count]
        target.fill(0)
        target[self.index[lo:hi] - start] = self.vals[lo:hi]
        self.index, self.vals = self.index[hi:], self.vals[hi:]  # entries before ``stop`` are done
        self.cursor = stop


class LowRankReader(Reader):
    """``B[rows] @ A`` for the rows a block covers: ``A`` (rank x in) read once, rows of ``B`` as needed.

    The product goes into a reused float64 buffer on ``blas.decode_threads()`` BLAS threads (1 on 2
    cores) and is rounded once: the values of ``lowrank.product`` (float64 sums of exact products,
    rounded once), with no temporary arrays per block; decoded ahead (``Reader``).
    """

    AHEAD = True
    # Rows per product at least (spans of whole reads, at most 8): dgemm with rank 64 costs about
    # 4.0 ns/element over 30 rows of 8960 columns (one 2^18-element block of down_proj), 2.97 over 120.
    MIN_ROWS = 128

    def __init__(self, decoder: Decoder, parts: dict[str, PartReader]) -> None:
        super().__init__(decoder, parts)
        a = parts["lora_A"]
        self.a = self.finite(a.values(0, a.part.info.numel), "lora_A").reshape(a.part.info.shape)
        self.a64 = self.a.astype(np.float64)
        self.rank = self.a.shape[0]
        self.wide = np.empty(0, np.float64)  # the float64 product of the rows a block covers

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        first, last = start // self.cols, (start + count - 1) // self.cols
        rows = last - first + 1
        b = self.finite(self.parts["lora_B"].values(first * self.rank, (last + 1) * self.rank), "lora_B")
        b64 = b.astype(np.float64).reshape(rows, self.rank)
        skip = start - first * self.cols
        if self.wide.size < rows * self.cols:
            self.wide = np.empty(rows * self.cols, np.float64)
        with blas.one_thread(DECODE_THREADS):
            if first == last:  # part of one row: only its columns
                wide = self.wide[:count].reshape(1, count)
                np.matmul(b64, self.a64[:, skip : skip + count], out=wide)
                skip = 0
            else:
                wide = self.wide[: rows * self.cols].reshape(rows, self.cols)
                np.matmul(b64, self.a64, out=wide)
        np.copyto(out[:count], wide.reshape(-1)[skip : skip + count], casting="same_kind")

    def span(self, count: int) -> int:
        return count * max(1, min(8, -(-self.MIN_ROWS * self.cols // count)))

    def whole(self) -> np.ndarray:
        """Older versions decoded ``B @ A`` as one float32 matrix product: that is what they hashed."""
        b = self.parts["lora_B"].values(0, self.parts["lora_B"].part.info.numel)
        return (b.reshape(-1, self.rank) @ self.a).astype(np.float32, copy=False)


DECODE_AHEAD = os.environ.get("HF_RESIDUAL_DECODE_AHEAD", "1") != "0"
DECODE_THREADS = blas.decode_threads()
_workers: dict[int, ThreadPoolExecutor] = {}
_workers_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The one worker thread that decodes blocks ahead, started on first use in each process (a forked
    child inherits the parent's executor without its thread, which would never run a task)."""
    with _workers_lock:
        pool = _workers.get(os.getpid())
        if pool is None:
            _workers.clear()
            pool = _workers[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="hf-residual-decode")
    return pool


READERS: dict[str, type[Reader]] = {
    "dense": DenseReader,
    "bitdelta": BitDeltaReader,
    "sparse": SparseReader,
    "lowrank": LowRankReader,
}


def open_residual(folder: Path) -> tuple[Manifest, Checkpoint]:
    """A residual folder's manifest and weights as the engine reads them.

    A dense residual: as stored. A compressed one: each encoded tensor a ``DecodedInfo`` (F32) with its
    codec's block decoder; each dense (bfloat16) tensor its stored ``TensorInfo`` with its stored bytes'
    digest in the returned manifest (older residuals: a ``DecodedInfo`` too, see the module doc).
    """
    manifest = read_manifest(folder)
    stored = open_checkpoint(folder, prefix=WEIGHTS_PREFIX)
    if manifest.codec in CODECS:
        return manifest, stored
    codec = registry.from_manifest(manifest.codec_params, manifest.tool_version)
    tensors: dict[str, TensorInfo] = {}
    entries: dict[str, TensorEntry] = {}
    for name, entry in sorted(manifest.tensors.items()):
        info = dict(entry.codec or {})
        kind = info.get("kind")
        if kind not in ("dense", codec.name):
            raise ManifestError(
                f"{folder}: tensor {name!r} is stored as {kind!r}, unknown to hf-residual {__version__}; it was "
                f"written by hf-residual {manifest.tool_version}: upgrade to at least that version"
            )
        names = {"dense": name} if kind == "dense" else {p: f"{name}.{p}" for p in info.get("parts", [])}
        missing = [n for n in names.values() if n not in stored.tensors]
        if missing:
            raise VerificationError(
                f"{folder}: the manifest records stored part(s) {', '.join(missing)} that the weight files lack: "
                "the residual is damaged; re-download it, or re-extract it"
            )
        if kind == "dense" and info.get("stored_sha256"):  # an ordinary source, hashed by the engine
            tensors[name] = stored.tensors[name]
            entries[name] = dataclasses.replace(
                entry, dtype=tensors[name].dtype, sha256=info["stored_sha256"]
            )
            continue
        digests = info.get("stored_sha256") if kind == "dense" else info.get("part_sha256")
        parts = tuple(
            (key, Part(stored.tensors[n], (digests or {}).get(key))) for key, n in sorted(names.items())
        )
        decoder = Decoder(
            name,
            tuple(entry.shape),
            kind,
            parts,
            tuple(sorted((k, v) for k, v in info.items() if isinstance(v, (str, int, float)))),
            None if digests else entry.sha256,
        )
        first = parts[0][1].info
        tensors[name] = DecodedInfo(name, "F32", tuple(entry.shape), first.file, first.offset, decoder)
        entries[name] = entry
    view = dataclasses.replace(manifest, tensors=entries)
    return view, dataclasses.replace(stored, tensors=tensors)


def checksums(manifest: Manifest, checkpoint: Checkpoint) -> dict[str, str]:
    """Digests the engine checks on the bytes it reads: not those of encoded tensors (their readers do)."""
    return {n: s for n, s in manifest.checksums.items() if not is_decoded(checkpoint.tensors[n])}
