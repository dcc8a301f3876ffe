"""``sparse:DENSITY`` (DARE) and ``sparse:topk=DENSITY`` (magnitude): keep a share of the elements.

DARE (Yu et al. 2024) keeps each element with probability DENSITY and rescales kept ones by 1/DENSITY,
so the expectation is R; its random mask is seeded (``seed=N``, default 0, mixed with the tensor name)
and the seed is recorded per tensor. Top-k keeps the DENSITY share of largest |R|, unscaled.
Layout: ``gaps`` (differences of sorted flat indices, the first from -1, in the smallest unsigned
dtype that holds them) and ``values`` (bfloat16, or ``dtype=float32``).
"""

from __future__ import annotations

import zlib

import numpy as np

from hf_residual.codecs.base import Codec, Encoded, storage_dtype, to_float, to_int
from hf_residual.codecs.store import round_bf16
from hf_residual.errors import ConfigError


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same codec seed gives each tensor its own, reproducible mask."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def gaps_dtype(largest: int) -> str:
    for dtype, limit in (("U8", 2**8), ("U16", 2**16), ("U32", 2**32)):
        if largest < limit:
            return dtype
    raise ConfigError("a tensor with more than 2^32 elements between kept values cannot be stored sparsely")


class Sparse(Codec):
    name = "sparse"

    def __init__(self, spec: str, density: float, method: str, seed: int, dtype: str, options: dict):
        super().__init__(spec, options)
        self.density, self.method, self.seed, self.dtype = density, method, seed, dtype

    @classmethod
    def parse(cls, spec: str, positional: str | None, options: dict[str, str]) -> Sparse:
        topk = options.pop("topk", None)
        dare = options.pop("density", positional)
        if (topk is None) == (dare is None):
            raise ConfigError(
                f"codec {spec!r}: give a density (sparse:0.1, DARE) or a share (sparse:topk=0.1)"
            )
        method = "topk" if topk is not None else "dare"
        density = to_float(spec, "density", topk if topk is not None else dare, 0.0, 1.0)
        seed_text = options.pop("seed", None)
        if seed_text is not None and method == "topk":
            raise ConfigError(f"codec {spec!r}: seed only applies to DARE (sparse:0.1,seed=3), not topk")
        seed = to_int(spec, "seed", seed_text or "0", 0)
        return cls(spec, density, method, seed, storage_dtype(spec, options), options)

    def _keep(self, name: str, flat: np.ndarray) -> tuple[np.ndarray, dict]:
        if self.method == "topk":
            k = max(1, int(round(self.density * flat.size)))
            index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
            return index, {"method": "topk", "kept": int(k)}
        seed = tensor_seed(self.seed, name)
        mask = np.random.default_rng(seed).random(flat.size) < self.density
        return np.flatnonzero(mask), {"method": "dare", "seed": seed, "kept": int(mask.sum())}

    def encode(self, name: str, matrix: np.ndarray) -> Encoded:
        flat = matrix.reshape(-1)
        index, params = self._keep(name, flat)
        values = flat[index]
        if self.method == "dare":
            values = values / np.float32(self.density)
        gaps = np.diff(index, prepend=-1)
        gap_dtype = gaps_dtype(int(gaps.max()) if gaps.size else 0)
        params.update(density=self.density, value_dtype=self.dtype)
        return Encoded({"gaps": (gap_dtype, gaps), "values": (self.dtype, values.astype(np.float32))}, params)

    def decode(self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict) -> np.ndarray:
        out = np.zeros(int(np.prod(shape)), np.float32)
        index = np.cumsum(parts["gaps"].astype(np.int64)) - 1
        out[index] = parts["values"]
        return out.reshape(shape)

    def describe(self) -> dict:
        return {**super().describe(), "density": self.density, "method": self.method, "seed": self.seed}

    def note(self) -> str:
        how = (
            f"DARE: each element kept with probability {self.density:g} and rescaled by 1/{self.density:g}, "
            f"seed {self.seed} (per-tensor seeds in the manifest)"
            if self.method == "dare"
            else f"the {self.density:g} share of largest |R| per matrix kept"
        )
        return f"lossy codec {self.spec}: sparse weight matrices ({how}); {self.dense_text()}"


__all__ = ["Sparse", "round_bf16", "tensor_seed"]
