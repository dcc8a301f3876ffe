"""Exactness: port equals the float32 reference bit for bit; float32 residuals are lossless."""

from __future__ import annotations

import json

import numba  # noqa: F401  (a dependency: a broken install must fail here, not skip)
import numpy as np
import pytest
import torch
from helpers import bits, load_tensors, reference_port
from safetensors.torch import load_file

from hf_residual import api
from hf_residual.toy import ARCHITECTURES

DTYPES = ["bfloat16", "float16", "float32"]


@pytest.fixture(params=["fused", "numpy"])
def kernel_path(request, monkeypatch):
    """Both engine paths (numba-fused and plain numpy) must give the same, exact bits.

    numba is a dependency: the fused kernels must be there. A spy on the engine's kernel choice checks
    that the path named is the path taken (the fused parameter would prove nothing on the numpy path).
    """
    from hf_residual.core import engine, fused

    assert fused.AVAILABLE, "numba is a dependency of hf-residual: hf_residual.core.fused failed to import it"
    chosen = []
    choose = engine._fused_kernel

    def spy(*args, **kwargs):
        kernel = choose(*args, **kwargs)
        chosen.append(kernel)
        return kernel

    monkeypatch.setattr(engine, "_fused_kernel", spy)
    if request.param == "numpy":
        monkeypatch.setattr(fused, "AVAILABLE", False)
    yield request.param
    used = [kernel for kernel in chosen if kernel is not None]
    assert bool(used) == (request.param == "fused"), f"{request.param} path asked, fused kernels used: {used}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_port_matches_float32_reference_bit_for_bit(families, tmp_path, arch, dtype, kernel_path):
    family = families(arch, dtype)
    alpha = 0.7
    result = api.port(
        family.instruct, family.cpt, tmp_path / "out", base=family.base, alpha=alpha, progress=False
    )
    out, t, i, b = (load_tensors(p) for p in (result.output, family.cpt, family.instruct, family.base))
    assert out.keys() == t.keys()
    for name in t:
        assert out[name].dtype == t[name].dtype
        expected = reference_port(t[name], i[name], b[name], alpha)
        assert torch.equal(bits(out[name]), bits(expected)), name


@pytest.mark.parametrize("block", [1000, 2049])
def test_tensors_spanning_many_blocks_are_exact(families, tmp_path, monkeypatch, kernel_path, block):
    """Blocks much smaller than the tensors (and not dividing their sizes): same bits as the reference."""
    from hf_residual.core import engine

    monkeypatch.setattr(engine, "DEFAULT_BLOCK", block)
    family = families("qwen2", "bfloat16")
    result = api.port(
        family.instruct, family.cpt, tmp_path / "out", base=family.base, alpha=0.9, progress=False
    )
    out, t, i, b = (load_tensors(p) for p in (result.output, family.cpt, family.instruct, family.base))
    assert max(x.numel() for x in t.values()) > 4 * block
    for name in t:
        assert torch.equal(bits(out[name]), bits(reference_port(t[name], i[name], b[name], 0.9))), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_residual_is_lossless(families, tmp_path, arch, dtype, kernel_path):
    family = families(arch, dtype)
    api.extract(family.instruct, family.base, tmp_path / "r", dtype="float32", progress=False)
    assert json.loads((tmp_path / "r" / "residual.json").read_text())["lossless"] is True
    api.apply(tmp_path / "r", family.base, tmp_path / "back", progress=False)
    back, instruct = load_tensors(tmp_path / "back"), load_tensors(family.instruct)
    assert back.keys() == instruct.keys()
    for name in instruct:
        assert torch.equal(bits(back[name]), bits(instruct[name])), name


def test_apply_of_float32_residual_equals_port(llama, tmp_path, kernel_path):
    api.extract(llama.instruct, llama.base, tmp_path / "r", dtype="float32", progress=False)
    api.apply(tmp_path / "r", llama.cpt, tmp_path / "a", alpha=1.3, progress=False)
    api.port(llama.instruct, llama.cpt, tmp_path / "p", base=llama.base, alpha=1.3, progress=False)
    a, p = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "p")
    assert all(torch.equal(bits(a[k]), bits(p[k])) for k in p)


def test_bfloat16_residual_is_within_one_rounding(llama, tmp_path):
    api.extract(llama.instruct, llama.base, tmp_path / "r", progress=False)
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    assert manifest["codec"] == "bfloat16" and manifest["lossless"] is False and "lossy" in manifest["note"]
    residual = load_tensors(tmp_path / "r")
    i, b = load_tensors(llama.instruct), load_tensors(llama.base)
    for name in i:
        exact = i[name].float() - b[name].float()
        assert residual[name].dtype == torch.bfloat16
        assert torch.equal(bits(residual[name]), bits(exact.to(torch.bfloat16))), name


def test_lossless_on_adversarial_bf16_values(tmp_path):
    """Edge values: zeros of both signs, subnormals, huge and tiny magnitudes, far-apart exponents."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0, 1e-30, 65504.0, 2**-126])
    n = 4096
    exps = torch.from_numpy(rng.integers(-120, 120, n)).float()
    base = torch.cat([special, torch.randn(n) * torch.pow(2.0, exps)]).to(torch.bfloat16)
    exps2 = torch.from_numpy(rng.integers(-120, 120, n)).float()
    instruct = torch.cat([special.flip(0), torch.randn(n) * torch.pow(2.0, exps2)]).to(torch.bfloat16)
    for name, value in (("base", base), ("instruct", instruct)):
        (tmp_path / name).mkdir()
        save_file({"w": value.reshape(1, -1)}, tmp_path / name / "model.safetensors")
    api.extract(tmp_path / "instruct", tmp_path / "base", tmp_path / "r", dtype="float32", progress=False)
    api.apply(tmp_path / "r", tmp_path / "base", tmp_path / "back", progress=False, force=True)
    back = load_tensors(tmp_path / "back")["w"].reshape(-1)
    recovered = bits(back) == bits(instruct)
    # Where |I| is more than 2^16 below |B| no float32 value can carry I through B + R: the manifest
    # must count exactly those elements and stop calling the residual lossless.
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    assert manifest["inexact_elements"] == int((~recovered).sum()) > 0
    assert manifest["lossless"] is False
    gap = (torch.log2(base.float().abs() + 1e-45) - torch.log2(instruct.float().abs() + 1e-45)).abs()
    near = (gap < 14) & (base.float().abs() < 1e38) & (instruct.float().abs() < 1e38)
    assert bool(recovered[near].all())


def test_sharded_output_has_index_and_loads(families, tmp_path):
    family = families("llama", "bfloat16", max_shard_size="20KB")
    api.port(
        family.instruct, family.cpt, tmp_path / "out", base=family.base, max_shard_size="30KB", progress=False
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(load_tensors(family.cpt))
    out, t, i, b = (load_tensors(p) for p in (tmp_path / "out", family.cpt, family.instruct, family.base))
    for name, shard in index["weight_map"].items():  # each tensor in the shard the index names, exact
        assert name in load_file(tmp_path / "out" / shard), name
        assert torch.equal(bits(out[name]), bits(reference_port(t[name], i[name], b[name], 1.0))), name
