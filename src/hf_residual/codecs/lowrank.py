"""``lowrank:RANK`` / ``lowrank:energy=0.9``: truncated SVD per matrix, stored as LoRA factors.

``R ~ B @ A`` with ``B = U sqrt(S)`` (out x r) and ``A = sqrt(S) Vt`` (r x in), so the factors are
exactly what a PEFT LoRA adapter holds (``lora_B``, ``lora_A``, scaling 1). ``energy=E`` keeps the
smallest rank whose singular values hold a share E of ``|R|^2`` (per matrix). ``dtype=float32`` stores
the factors in float32 (default bfloat16).
"""

from __future__ import annotations

import numpy as np

from hf_residual.codecs.base import Codec, Encoded, storage_dtype, to_float, to_int
from hf_residual.errors import ConfigError


def product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``B @ A`` accumulated in float64, rounded once to float32: how lowrank residuals decode.

    Products of bfloat16 factors are exact in float64 and so are their sums over the rank (unless terms
    differ by more than about 2^30), so the float32 result is the correctly rounded exact product,
    whatever rows a BLAS call covers: decoding a block of rows gives the bits the whole matrix gives.
    """
    return np.matmul(b.astype(np.float64, copy=False), a.astype(np.float64, copy=False)).astype(np.float32)


class LowRank(Codec):
    name = "lowrank"

    def __init__(self, spec: str, rank: int | None, energy: float | None, dtype: str, options: dict):
        super().__init__(spec, options)
        self.rank, self.energy, self.dtype = rank, energy, dtype

    @classmethod
    def parse(cls, spec: str, positional: str | None, options: dict[str, str]) -> LowRank:
        energy_text = options.pop("energy", None)
        rank_text = options.pop("rank", positional)
        if (rank_text is None) == (energy_text is None):
            raise ConfigError(
                f"codec {spec!r}: give a rank (lowrank:64) or an energy share (lowrank:energy=0.9)"
            )
        rank = to_int(spec, "rank", rank_text, 1) if rank_text is not None else None
        energy = to_float(spec, "energy", energy_text, 0.0, 1.0) if energy_text is not None else None
        return cls(spec, rank, energy, storage_dtype(spec, options), options)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self.rank is not None and self.rank > min(shape):
            raise ConfigError(
                f"codec {self.spec!r}: rank {self.rank} is larger than tensor {name!r} of shape {list(shape)} "
                f"allows (at most {min(shape)}); choose a smaller rank, or lowrank:energy=0.9"
            )

    def choose_rank(self, singular: np.ndarray) -> int:
        if self.rank is not None:
            return self.rank
        power = np.cumsum(singular.astype(np.float64) ** 2)
        if power[-1] == 0:
            return 1
        return int(min(len(singular), np.searchsorted(power / power[-1], self.energy - 1e-12) + 1))

    def encode(self, name: str, matrix: np.ndarray) -> Encoded | None:
        self.check_shape(name, matrix.shape)
        u, s, vt = np.linalg.svd(matrix.astype(np.float32, copy=False), full_matrices=False)
        rank = self.choose_rank(s)
        rows, cols = matrix.shape
        if rank * (rows + cols) * (2 if self.dtype == "BF16" else 4) >= rows * cols * 2:
            return None  # the factors would be no smaller than the dense bfloat16 matrix
        root = np.sqrt(s[:rank])
        b = u[:, :rank] * root[None, :]
        a = root[:, None] * vt[:rank]
        total = float(np.sum(s.astype(np.float64) ** 2))
        kept = float(np.sum(s[:rank].astype(np.float64) ** 2))
        params = {"rank": rank, "energy": kept / total if total else 1.0, "factor_dtype": self.dtype}
        return Encoded({"lora_A": (self.dtype, a), "lora_B": (self.dtype, b)}, params)

    def decode(self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict) -> np.ndarray:
        return product(parts["lora_B"], parts["lora_A"]).reshape(shape)

    def legacy_decode(
        self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict, decoded: np.ndarray
    ) -> np.ndarray:
        """Older versions decoded (and hashed) one float32 matrix product ``B @ A``."""
        return (parts["lora_B"] @ parts["lora_A"]).astype(np.float32, copy=False).reshape(shape)

    def describe(self) -> dict:
        return {**super().describe(), "rank": self.rank, "energy": self.energy, "factor_dtype": self.dtype}

    def note(self) -> str:
        chosen = (
            f"rank {self.rank}"
            if self.rank is not None
            else f"the smallest rank keeping {self.energy:g} of |R|^2"
        )
        return (
            f"lossy codec {self.spec}: truncated SVD of each weight matrix at {chosen} (factors in "
            f"{self.dtype}); {self.dense_text()}. Also a PEFT LoRA adapter "
            "(adapter_config.json, adapter_model.safetensors)"
        )
