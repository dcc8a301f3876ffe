"""Test helpers: a folder's tensors loaded with the real safetensors library, and independent references
(float32 math written here, not the package's) to compare them with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so comparisons are exact (NaN-safe, -0.0 distinct from 0.0)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view)


def reference_port(
    target: torch.Tensor, instruct: torch.Tensor, base: torch.Tensor, alpha: float
) -> torch.Tensor:
    """float32 math, one rounding to the target dtype: T + alpha * (I - B)."""
    residual = instruct.float() - base.float()
    if alpha != 1.0:
        residual = residual * torch.tensor(alpha, dtype=torch.float32)
    return (target.float() + residual).to(target.dtype)


def check_decoded_residual(residual_folder, family, min_cosine: float, rank: int | None = None) -> None:
    """The decoded residual against the exact I - B, independently of the codec's code: dense tensors are
    I - B rounded once to bfloat16; compressed ones point the same way (cosine), and a rank-r decoding is
    rank r and as close to I - B as the best rank-r matrix (Eckart-Young), up to bfloat16 factors."""
    from hf_residual.codecs.folders import decoded_tensors

    instruct, base = load_tensors(family.instruct), load_tensors(family.base)
    kinds = {
        k: e["codec"]["kind"]
        for k, e in json.loads((Path(residual_folder) / "residual.json").read_text())["tensors"].items()
    }
    compressed = 0
    for name, decoded in decoded_tensors(residual_folder):
        exact = (instruct[name].float() - base[name].float()).numpy()
        if kinds[name] == "dense":
            assert np.array_equal(decoded, torch.from_numpy(exact).to(torch.bfloat16).float().numpy()), name
            continue
        compressed += 1
        cosine = float((decoded * exact).sum() / (np.linalg.norm(decoded) * np.linalg.norm(exact)))
        assert cosine > min_cosine, (name, cosine)
        if rank is not None:
            singular = np.linalg.svd(exact, compute_uv=False)
            best = np.sqrt((singular[rank:] ** 2).sum())
            assert np.linalg.matrix_rank(decoded) <= rank, name
            assert np.linalg.norm(decoded - exact) <= best + 0.005 * np.linalg.norm(exact), name
    assert compressed >= 14  # the 7 projections of both layers at least


def matches(folder: Path, expected: dict[str, torch.Tensor]) -> bool:
    """The folder's tensors equal ``expected`` bit for bit (same names, dtypes and bits)."""
    got = load_tensors(folder)
    return got.keys() == expected.keys() and all(
        got[k].dtype == expected[k].dtype and torch.equal(bits(got[k]), bits(expected[k])) for k in expected
    )


def reference_folders(target: Path, instruct: Path, base: Path) -> dict[str, torch.Tensor]:
    """The independent float32 reference of a port of whole folders: T + (I - B), rounded once."""
    t, i, b = load_tensors(target), load_tensors(instruct), load_tensors(base)
    return {name: reference_port(t[name], i[name], b[name], 1.0) for name in t}
