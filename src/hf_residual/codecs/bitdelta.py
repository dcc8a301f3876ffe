"""``bitdelta``: one sign bit per element plus one scale per matrix (BitDelta, Liu et al. 2024).

``R ~ scale * sign(R)`` with ``scale = mean |R|`` (the L2-optimal scale for a sign matrix). Signs are
packed 8 per byte (``numpy.packbits``, big bit order); elements equal to zero decode as ``+scale``.
``bitdelta,scale=row`` stores one scale per row instead (``mean |R[i]|``, float32; the L2-optimal scale
of each row): 32 more bits per row, which pays off on embeddings and LM heads, whose rows (tokens)
change by very different amounts.
"""

from __future__ import annotations

import numpy as np

from hf_residual.codecs.base import Codec, Encoded
from hf_residual.errors import ConfigError


class BitDelta(Codec):
    name = "bitdelta"

    def __init__(self, spec: str, per_row: bool, options: dict[str, str]):
        super().__init__(spec, options)
        self.per_row = per_row

    @classmethod
    def parse(cls, spec: str, positional: str | None, options: dict[str, str]) -> BitDelta:
        if positional is not None:
            raise ConfigError(
                f"codec {spec!r}: bitdelta takes no value; write bitdelta or bitdelta,scale=row"
            )
        scale = options.pop("scale", "matrix").lower()
        if scale not in ("matrix", "row"):
            raise ConfigError(f"codec {spec!r}: scale must be matrix or row, got {scale!r}")
        return cls(spec, scale == "row", options)

    def encode(self, name: str, matrix: np.ndarray) -> Encoded:
        signs = np.packbits(matrix.reshape(-1) >= 0)
        if self.per_row:
            scales = np.mean(np.abs(matrix), axis=1, dtype=np.float64).astype(np.float32)
            params = {"scale": "row", "mean_scale": float(scales.mean())}
        else:
            scales = np.array([np.mean(np.abs(matrix), dtype=np.float64)], np.float32)
            params = {"scale": float(scales[0])}
        return Encoded({"signs": ("U8", signs), "scale": ("F32", scales)}, params)

    def decode(self, shape: tuple[int, ...], parts: dict[str, np.ndarray], params: dict) -> np.ndarray:
        count = int(np.prod(shape))
        positive = np.unpackbits(parts["signs"], count=count).astype(bool).reshape(shape)
        scales = parts["scale"].astype(np.float32)
        scale = scales[:, None] if params.get("scale") == "row" else np.float32(scales[0])
        return np.where(positive, scale, -scale).astype(np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "scale": "row" if self.per_row else "matrix"}

    def note(self) -> str:
        scale = "one scale per row (mean |R[i]|)" if self.per_row else "one scale (mean |R|)"
        return (
            f"lossy codec {self.spec}: each weight matrix stored as its signs (1 bit per element) times "
            f"{scale}; {self.dense_text()}"
        )
