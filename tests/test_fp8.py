"""FP8 checkpoints with block scales (DeepSeek-V3/R1, Qwen3-*-FP8 layout) as instruct, base or target.

The FP8 folders are written here by hand in the published layout (``F8_E4M3`` weights, an ``F32``
``weight_scale_inv`` of shape ``[ceil(rows / b0), ceil(cols / b1)]`` beside each, ``quantization_config`` in
config.json), with torch only. References are torch float32 math on the dequantized values, rounded once.
The toy models have hidden size 160: matrices of 160, 320 and 80 rows or columns, none a multiple of 128.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import bits, load_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.core import engine, kernels
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.errors import ConfigError, IncompatibleModelsError

F8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def family(families):
    return families("llama", "bfloat16", hidden=160)


def quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and name.endswith("proj.weight")


def expand(scale: torch.Tensor, shape, block) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def quantize(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: scale = amax / 448 (1 for a zero block), codes = weight / scale rounded to E4M3."""
    rows, cols = weight.shape
    scale = torch.ones(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    w = weight.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            amax = part.abs().max()
            if amax > 0:
                scale[i, j] = amax / torch.tensor(FP8_MAX)
    codes = (w / expand(scale, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(F8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    return codes.float() * expand(scale, codes.shape, block)


def make_fp8(source, folder, block=(128, 128), split_scales=False) -> None:
    """``source`` re-saved in the FP8 layout: every 2-D ``*proj.weight`` quantized with ``block``.

    ``split_scales``: scales in a second shard (with an index), away from their weights.
    """
    shutil.copytree(source, folder)
    for file in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        file.unlink()
    weights, scales = {}, {}
    for name, tensor in load_tensors(source).items():
        if quantized(name, tensor):
            weights[name], scales[name + "_scale_inv"] = quantize(tensor, block)
        else:
            weights[name] = tensor
    if split_scales:
        save_file(weights, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        save_file(scales, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
        weight_map = {n: "model-00001-of-00002.safetensors" for n in weights}
        weight_map.update({n: "model-00002-of-00002.safetensors" for n in scales})
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({**weights, **scales}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (folder / "config.json").write_text(json.dumps(config))


def values(folder, block=(128, 128)) -> dict[str, torch.Tensor]:
    """A folder's weights as the model means them: FP8 ones dequantized in float32, scales consumed."""
    tensors = load_tensors(folder)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = tensor if scale is None else dequantize(tensor, scale, block)
    return out


def layout(folder) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        header_len = int.from_bytes(file.read_bytes()[:8], "little")
        header = json.loads(file.read_bytes()[8 : 8 + header_len])
        header.pop("__metadata__", None)
        out.update({name: (entry["dtype"], entry["shape"]) for name, entry in header.items()})
    return out


@pytest.mark.parametrize("numba", [True, False])  # fused.dequant_block, or numpy's table and row runs
def test_decode_reads_any_element_range_of_an_fp8_weight_through_its_block_scales(
    tmp_path, monkeypatch, numba
):
    from hf_residual.core import fused

    monkeypatch.setattr(fused, "AVAILABLE", numba and fused.AVAILABLE)
    torch.manual_seed(0)
    weight = torch.randn(300, 200) * torch.linspace(0.01, 3, 200)
    codes, scale = quantize(weight, (128, 128))
    assert list(scale.shape) == [3, 2]
    (tmp_path / "m").mkdir()
    save_file({"w.weight": codes, "w.weight_scale_inv": scale}, tmp_path / "m" / "model.safetensors")
    ckpt = open_checkpoint(tmp_path / "m")
    assert list(ckpt.tensors) == ["w.weight"]  # the scale is consumed, not a weight
    info = ckpt.tensors["w.weight"]
    expected = dequantize(codes, scale, (128, 128)).reshape(-1).numpy()
    buffers = kernels.BlockBuffers(60000)
    out = np.empty(60000, np.float32)
    fd = os.open(info.file, os.O_RDONLY)
    try:  # mid-row starts and ends, runs across row blocks (row 128, 256) and column blocks (col 128)
        for start, count in [(0, 60000), (77, 1), (199, 2), (25_550, 200), (25_500, 30_000), (59_999, 1)]:
            kernels.decode(fd, info, start, count, out, buffers)
            assert np.array_equal(out[:count], expected[start : start + count]), (start, count)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("block", "path"),  # one engine block per tensor, or blocks of whole rows (1000 -> 960 or 640)
    [(None, "fused"), (1000, "fused"), (1000, "numpy"), (1000, "mmap")],
)
def test_port_fp8_instruct_and_base_onto_bf16_target_matches_dequantized_reference(
    family, tmp_path, monkeypatch, block, path
):
    from hf_residual.core import fused

    if block:
        monkeypatch.setattr(engine, "DEFAULT_BLOCK", block)
    if path == "numpy":
        monkeypatch.setattr(fused, "AVAILABLE", False)
    if path == "mmap":
        monkeypatch.setattr(engine, "READ_MODE", "mmap")
    chosen = []
    choose = engine._fused_kernel
    monkeypatch.setattr(engine, "_fused_kernel", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    instruct, base = tmp_path / "instruct-fp8", tmp_path / "base-fp8"
    make_fp8(family.instruct, instruct)
    make_fp8(family.base, base, split_scales=True)
    out = api.port(instruct, family.cpt, tmp_path / "out", base=base, progress=False).output
    got, t, i, b = load_tensors(out), load_tensors(family.cpt), values(instruct), values(base)
    assert got.keys() == t.keys()
    assert sum(quantized(n, x) for n, x in t.items()) == 14  # 7 projections in each of 2 layers
    for name in t:
        assert got[name].dtype == torch.bfloat16
        expected = (t[name].float() + (i[name].float() - b[name].float())).to(torch.bfloat16)
        assert torch.equal(bits(got[name]), bits(expected)), name
    assert (fused.port_block in chosen) == (path != "numpy")  # FP8 inputs dequantized, then fused
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_extract_from_fp8_instruct_and_base_is_the_dequantized_difference(family, tmp_path):
    instruct, base = tmp_path / "instruct-fp8", tmp_path / "base-fp8"
    make_fp8(family.instruct, instruct)
    make_fp8(family.base, base)
    residual = api.extract(instruct, base, tmp_path / "r", dtype="float32", progress=False).output
    got, i, b = load_tensors(residual), values(instruct), values(base)
    assert got.keys() == i.keys()
    for name in i:
        assert torch.equal(bits(got[name]), bits(i[name].float() - b[name].float())), name
    manifest = json.loads((residual / "residual.json").read_text())
    assert manifest["lossless"] is False  # B + R gives the dequantized weights, not the FP8 codes
    assert manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["source_dtype"] == "F8_E4M3"
    out = api.apply(residual, family.cpt, tmp_path / "out", progress=False).output
    t, ported = load_tensors(family.cpt), load_tensors(out)
    for name in t:
        assert torch.equal(bits(ported[name]), bits((t[name].float() + got[name]).to(torch.bfloat16))), name


@pytest.mark.parametrize("via", ["port", "apply"])
def test_bf16_residual_onto_fp8_target_writes_bf16_and_drops_quantization_config(family, tmp_path, via):
    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target)
    if via == "port":
        out = api.port(family.instruct, target, tmp_path / "out", base=family.base, progress=False).output
        i, b = load_tensors(family.instruct), load_tensors(family.base)
        residual = {n: i[n].float() - b[n].float() for n in i}
    else:
        r = api.extract(family.instruct, family.base, tmp_path / "r", dtype="float32", progress=False).output
        out = api.apply(r, target, tmp_path / "out", alpha=0.7, progress=False).output
        residual = {n: x * torch.tensor(0.7) for n, x in load_tensors(r).items()}
    got, t = load_tensors(out), values(target)
    assert got.keys() == t.keys()  # no weight_scale_inv left
    for name in t:
        assert got[name].dtype == torch.bfloat16
        expected = (t[name].float() + residual[name]).to(torch.bfloat16)
        assert torch.equal(bits(got[name]), bits(expected)), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    card = (out / "README.md").read_text()
    assert "## FP8" in card and "bfloat16" in card and "quantization_config" in card
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("block", [(128, 128), (64, 48)])
def test_keep_fp8_requantizes_with_the_targets_blocks_and_layout(family, tmp_path, block):
    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target, block=block)
    out = api.port(
        family.instruct, target, tmp_path / "out", base=family.base, keep_fp8=True, progress=False
    ).output
    assert layout(out) == layout(target)  # same names, dtypes (F8_E4M3, F32 scales), scale shapes
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((target / "config.json").read_text())["quantization_config"]
    )
    assert "--keep-fp8" in (out / "README.md").read_text()
    got, t = load_tensors(out), values(target, block)
    i, b = load_tensors(family.instruct), load_tensors(family.base)
    checked = 0
    for name, expected in t.items():
        exact = expected.float() + (i[name].float() - b[name].float())  # float32 reference
        if name + "_scale_inv" not in got:
            assert torch.equal(bits(got[name]), bits(exact.to(torch.bfloat16))), name
            continue
        checked += 1
        codes, scale = quantize(exact, block)  # scales: amax / 448 per block, recomputed
        assert torch.equal(got[name + "_scale_inv"], scale), name
        assert torch.equal(got[name].view(torch.uint8), codes.view(torch.uint8)), name
        # within one FP8 rounding of the float32 reference: half a step of E4M3 at each value (ties are
        # common: bf16 inputs have few bits), plus the float32 rounding of dequantizing (codes * scale)
        scaled = (exact / expand(scale, exact.shape, block)).abs()
        step = torch.exp2(torch.floor(torch.log2(scaled.clamp(min=2.0**-6))) - 3)
        error = (dequantize(got[name], got[name + "_scale_inv"], block) - exact).abs()
        bound = step / 2 * expand(scale, exact.shape, block) + exact.abs() * 2.0**-22
        assert bool((error <= bound).all()), name
        assert bool((error > 0).any()), name  # FP8 did round: the check above has teeth
    assert checked == 14


def test_keep_fp8_on_the_command_line_with_apply(family, tmp_path):
    import subprocess

    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target)
    r = api.extract(family.instruct, family.base, tmp_path / "r", progress=False).output
    exe = [sys.executable, "-m", "hf_residual.cli"]
    done = subprocess.run(
        [*exe, "apply", str(r), "--to", str(target), "-o", str(tmp_path / "out"), "--keep-fp8", "-q"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert layout(tmp_path / "out") == layout(target)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == F8


def test_keep_fp8_without_an_fp8_target_is_refused(family, tmp_path):
    with pytest.raises(ConfigError, match="has no FP8 weights"):
        api.port(
            family.instruct, family.cpt, tmp_path / "out", base=family.base, keep_fp8=True, progress=False
        )
    assert not (tmp_path / "out").exists()


def test_fp8_weight_without_its_scale_is_refused_by_name(family, tmp_path):
    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target)
    tensors = load_tensors(target)
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError) as error:
        api.port(family.instruct, target, tmp_path / "out", base=family.base, progress=False)
    assert "'model.layers.1.self_attn.o_proj.weight'" in str(error.value) and "F8_E4M3" in str(error.value)


def test_fp8_scale_of_the_wrong_shape_is_refused(family, tmp_path):
    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target)
    tensors = load_tensors(target)
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)  # [160, 320]: needs [2, 3]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError, match=r"down_proj.weight_scale_inv.*F32 \[2, 3\]"):
        open_checkpoint(target)


@pytest.mark.parametrize(
    ("method", "named"),
    [
        ("gptq", "GPTQ"),
        ("awq", "AWQ"),
        ("bitsandbytes", "bitsandbytes"),
        ("compressed-tensors", "compressed"),
    ],
)
def test_other_quantization_methods_are_refused_naming_the_format(family, tmp_path, method, named):
    target = tmp_path / "quantized"
    shutil.copytree(family.cpt, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelsError) as error:
        api.port(family.instruct, target, tmp_path / "out", base=family.base, progress=False)
    message = str(error.value)
    assert (
        f"{named}" in message and f"quant_method {method!r}" in message and "unquantized release" in message
    )


def test_quantized_tensor_names_and_gguf_files_are_refused(family, tmp_path):
    target = tmp_path / "gptq"
    shutil.copytree(family.cpt, target)
    tensors = load_tensors(target)
    tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        IncompatibleModelsError, match="GPTQ/AWQ-quantized.*'model.layers.0.mlp.up_proj.qweight'"
    ):
        api.port(family.instruct, target, tmp_path / "out", base=family.base, progress=False)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        IncompatibleModelsError, match="only GGUF files found \\(model-Q4_K_M.gguf\\).*safetensors"
    ):
        api.port(family.instruct, gguf, tmp_path / "out2", base=family.base, progress=False)


def test_gguf_only_hub_repo_is_refused_naming_gguf_before_download(hub, family, tmp_path):
    repo = "org/gguf-only"
    hub.add_repo(
        repo,
        files={"config.json": (family.cpt / "config.json").read_bytes(), "m-Q4_K_M.gguf": b"GGUF" * 50_000},
    )
    with pytest.raises(IncompatibleModelsError, match="target model org/gguf-only: only GGUF files found"):
        api.port(family.instruct, repo, tmp_path / "out", base=family.base, progress=False)
    assert list((tmp_path / "hf_home").rglob("*.gguf")) == []


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("F8_E4M3", F8), ("F8_E5M2", torch.float8_e5m2)])
def test_fp8_encode_rounds_like_torch_and_saturates(dtype, torch_dtype):
    from hf_residual.core import fp8

    limit = torch.finfo(torch_dtype).max
    torch.manual_seed(0)
    x = torch.randn(100_000) * torch.exp(torch.randn(100_000) * 4)
    x = x.clamp(-limit, limit)
    exact = torch.arange(256, dtype=torch.uint8).view(torch_dtype).float()
    exact = exact[exact.isfinite()]
    ordered = exact[exact >= 0].unique()
    ties = (ordered[1:] + ordered[:-1]) / 2  # half way between neighbours: to the even code
    x = torch.cat([x, exact, ties, -ties, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    assert np.array_equal(fp8.encode(x.numpy(), dtype), x.to(torch_dtype).view(torch.uint8).numpy())
    beyond = np.array([limit * 1.5, -limit * 4, 3e38], np.float32)  # torch gives NaN/Inf; we saturate
    assert fp8.encode(beyond, dtype).tolist() == [
        fp8.MAX_CODE[dtype],
        0x80 | fp8.MAX_CODE[dtype],
        fp8.MAX_CODE[dtype],
    ]


def test_keep_fp8_on_the_command_line_with_port(family, tmp_path):
    from hf_residual.cli import main

    target = tmp_path / "cpt-fp8"
    make_fp8(family.cpt, target)
    argv = ["port", str(family.instruct), "--base", str(family.base), "--to", str(target), "--keep-fp8", "-q"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0
    assert layout(tmp_path / "out") == layout(target)


@pytest.mark.parametrize("keep_fp8", [True, False])
def test_an_fp8_tensor_copied_unchanged_keeps_its_bytes_and_scales_or_becomes_bf16(tmp_path, keep_fp8):
    """A target tensor outside the residual (a multimodal target's vision tower) copied through."""
    from hf_residual.core import plans
    from hf_residual.core.engine import Segment, Source, TensorJob
    from hf_residual.core.safetensors_io import OutputTensor

    torch.manual_seed(0)
    codes, scale = quantize(torch.randn(200, 300), (128, 128))
    (tmp_path / "m").mkdir()
    save_file({"v.weight": codes, "v.weight_scale_inv": scale}, tmp_path / "m" / "model.safetensors")
    tensors = open_checkpoint(tmp_path / "m").tensors
    info = tensors["v.weight"]
    copy = TensorJob(
        OutputTensor("v.weight", info.dtype, info.shape), (Segment(0, info.numel, plus=Source(info)),)
    )
    jobs = plans.fp8_output_jobs([copy], tensors, keep_fp8)
    (tmp_path / "out").mkdir()
    engine.execute(engine.plan_shards(jobs, "model"), tmp_path / "out")
    got = load_tensors(tmp_path / "out")
    if keep_fp8:
        assert got.keys() == {"v.weight", "v.weight_scale_inv"}
        assert torch.equal(got["v.weight"].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(got["v.weight_scale_inv"], scale)
    else:
        assert got.keys() == {"v.weight"}
        assert torch.equal(
            bits(got["v.weight"]), bits(dequantize(codes, scale, (128, 128)).to(torch.bfloat16))
        )
