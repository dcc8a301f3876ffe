"""Stored parts of an encoded tensor, read with ``pread`` and hashed once, in order (``codecs.stream``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from hf_residual.codecs.store import NUMPY_DTYPES, from_bf16_bits
from hf_residual.core.kernels import pread_into
from hf_residual.core.safetensors_io import TensorInfo
from hf_residual.errors import VerificationError

FIX = "Nothing was written; re-download the residual, or re-extract it from the instruct and base models"


def sha256_of(values: np.ndarray) -> str:
    """The digest of an array's bytes (float32 for decoded values, the stored layout for parts)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


@dataclass(frozen=True)
class Part:
    """One stored part of an encoded tensor and the sha256 its bytes must have (None: not recorded)."""

    info: TensorInfo
    sha256: str | None


class PartReader:
    """Reads byte ranges of one part with ``pread`` and hashes each byte once, in order."""

    def __init__(self, part: Part, fd: int) -> None:
        self.part, self.fd = part, fd
        self.digest = hashlib.sha256() if part.sha256 else None
        self.hashed = 0  # bytes [0, hashed) went into the digest

    def read(self, begin: int, end: int) -> np.ndarray:
        """Bytes ``begin:end`` of the part (as uint8)."""
        raw = np.empty(end - begin, np.uint8)
        pread_into(self.fd, memoryview(raw), self.part.info.offset + begin)
        if self.digest is not None and end > self.hashed:
            if begin > self.hashed:  # bytes skipped so far: hashed now, so every byte counts once
                self._hash_span(self.hashed, begin)
            self.digest.update(raw[self.hashed - begin :] if self.hashed > begin else raw)
            self.hashed = end
        return raw

    def values(self, first: int, stop: int) -> np.ndarray:
        """Elements ``first:stop``: floating types as float32, integer types as stored."""
        size = self.part.info.itemsize
        raw = self.read(first * size, stop * size)
        if self.part.info.dtype == "BF16":
            return from_bf16_bits(raw.view(np.uint16))
        values = raw.view(NUMPY_DTYPES[self.part.info.dtype])
        return values.astype(np.float32, copy=False) if values.dtype.kind == "f" else values

    def _hash_span(self, begin: int, end: int, chunk: int = 1 << 24) -> None:
        for at in range(begin, end, chunk):
            raw = np.empty(min(chunk, end - at), np.uint8)
            pread_into(self.fd, memoryview(raw), self.part.info.offset + at)
            self.digest.update(raw)

    def check(self, tensor: str) -> None:
        if self.digest is None:
            return
        if self.hashed < self.part.info.nbytes:
            self._hash_span(self.hashed, self.part.info.nbytes)
            self.hashed = self.part.info.nbytes
        if self.digest.hexdigest() != self.part.sha256:
            raise VerificationError(
                f"part {self.part.info.name!r} of tensor {tensor!r} in {self.part.info.file} does not match the "
                f"sha256 recorded for it in {self.part.info.file.parent}'s manifest: the residual is damaged "
                f"(its data was altered or corrupted after it was written). {FIX}"
            )
