"""Codecs through the API, the CLI and PEFT, on tiny real transformers models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import bits, check_decoded_residual, load_tensors
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.cli import main
from hf_residual.codecs.folders import decoded_tensors
from hf_residual.errors import ConfigError, ManifestError, VerificationError


@pytest.fixture(scope="module")
def lowrank(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("codecs") / "lowrank"
    api.extract(llama.instruct, llama.base, out, codec="lowrank:8", max_shard_size="20KB", progress=False)
    return out


def _reference(target_folder, residual_folder) -> dict[str, torch.Tensor]:
    """T + decode(R) in float32, rounded once to the target dtype (what apply must write)."""
    target = load_tensors(target_folder)
    expected = {
        name: (target[name].float() + torch.from_numpy(values)).to(target[name].dtype)
        for name, values in decoded_tensors(residual_folder)
    }
    assert expected.keys() == target.keys()  # every tensor decoded: the comparisons cannot pass vacuously
    return expected


def _reference_rows(target_folder, residual_folder, rows: int) -> dict[str, torch.Tensor]:
    """Like ``_reference``, on the target's rows only (the residual's extra rows are absolute values)."""
    target = load_tensors(target_folder)
    expected = {
        name: (target[name].float() + torch.from_numpy(values[:rows] if values.ndim == 2 else values)).to(
            target[name].dtype
        )
        for name, values in decoded_tensors(residual_folder)
    }
    assert expected.keys() == target.keys()
    return expected


def test_lowrank_extract_records_codec_and_fidelity_and_apply_adds_the_decoded_residual(
    llama, lowrank, tmp_path
):
    manifest = json.loads((lowrank / "residual.json").read_text())
    assert manifest["codec"] == "lowrank" and manifest["codec_params"]["spec"] == "lowrank:8"
    entry = manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert entry["codec"]["kind"] == "lowrank" and entry["codec"]["rank"] == 8
    assert manifest["tensors"]["model.norm.weight"]["codec"]["kind"] == "dense"
    fidelity = manifest["fidelity"]
    assert fidelity["bf16_bytes"] / fidelity["bytes"] == pytest.approx(fidelity["ratio_to_bf16"])
    assert 0 < fidelity["errors"]["mean"] < 1 and not manifest["lossless"]
    assert "lowrank:8" in (lowrank / "README.md").read_text()
    assert not list(lowrank.parent.glob(".lowrank*")), "temporary exact residual left behind"
    check_decoded_residual(lowrank, llama, min_cosine=0.6, rank=8)

    api.apply(lowrank, llama.cpt, tmp_path / "ported", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ported"], "temporary decoded residual left behind"
    ported = load_tensors(tmp_path / "ported")
    for name, expected in _reference(llama.cpt, lowrank).items():
        assert torch.equal(bits(ported[name]), bits(expected)), name


def test_peft_loads_the_lowrank_residual_and_merges_to_the_ported_model(llama, lowrank):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((lowrank / "adapter_config.json").read_text())
    assert "q_proj" in config["target_modules"] and "embed_tokens" in config["target_modules"]
    target = AutoModelForCausalLM.from_pretrained(llama.cpt, dtype=torch.float32)
    model = PeftModel.from_pretrained(target, lowrank)
    merged = model.merge_and_unload().state_dict()
    cpt = load_tensors(llama.cpt)
    matrices = 0
    for name, values in decoded_tensors(lowrank):
        expected = cpt[name].float() + (torch.from_numpy(values) if values.ndim == 2 else 0)
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), name
        matrices += values.ndim == 2
    assert matrices == 16  # 7 projections x 2 layers + embeddings + lm_head: all 2-D residuals


def test_bitdelta_and_sparse_port_from_a_residual_folder(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    # min cosine with I - B: sign * mean|x| ~ sqrt(2/pi) = 0.8; DARE at density p ~ sqrt(p) = 0.5; top 10%
    # of the magnitudes of Gaussian-like values hold ~44% of the energy: ~0.66
    for spec, min_cosine in (
        ("bitdelta", 0.7),
        ("bitdelta,scale=row,embeddings=compress", 0.7),
        ("sparse:0.25,seed=5", 0.4),
        ("sparse:topk=0.1", 0.55),
    ):
        residual = tmp_path / spec.replace(":", "-")
        result = api.extract(llama.instruct, llama.base, residual, codec=spec, progress=False)
        assert result.details["fidelity"]["ratio_to_bf16"] > 1.0
        check_decoded_residual(residual, llama, min_cosine)
        ported = tmp_path / f"ported-{spec.replace(':', '-')}"
        api.port(residual, llama.cpt, ported, progress=False)
        got = load_tensors(ported)
        for name, expected in _reference(llama.cpt, residual).items():
            assert torch.equal(bits(got[name]), bits(expected)), (spec, name)
        model = AutoModelForCausalLM.from_pretrained(ported)
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
        assert f"residual codec: {spec}" in (ported / "README.md").read_text()


def test_codec_float32_and_bfloat16_are_the_dtypes(llama, tmp_path):
    result = api.extract(llama.instruct, llama.base, tmp_path / "r", codec="lossless", progress=False)
    assert result.details["codec"] == "float32" and result.details["lossless"]


def test_rank_larger_than_a_matrix_fails_before_any_output(llama, tmp_path):
    with pytest.raises(ConfigError, match="rank 64 is larger than tensor"):
        api.extract(llama.instruct, llama.base, tmp_path / "r", codec="lowrank:64", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_compressed_residual_is_refused(llama, lowrank, tmp_path):
    """An older residual (no part digests): the digest of the decoded tensor is checked instead."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(lowrank, copy)
    manifest = json.loads((copy / "residual.json").read_text())
    for entry in manifest["tensors"].values():
        entry["codec"].pop("part_sha256", None)
        entry["codec"].pop("stored_sha256", None)
    (copy / "residual.json").write_text(json.dumps(manifest))
    api.apply(copy, llama.cpt, tmp_path / "old", progress=False)  # the legacy digests hold
    manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["sha256"] = "0" * 64
    (copy / "residual.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match="checksum differs"):
        api.apply(copy, llama.cpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_codec_parameter_from_a_later_version_names_the_version_needed(llama, lowrank, tmp_path):
    import shutil

    copy = tmp_path / "future"
    shutil.copytree(lowrank, copy)
    manifest = json.loads((copy / "residual.json").read_text())
    manifest["codec_params"]["spec"] = "lowrank:8,quant=int4"
    manifest["tool_version"] = "0.9.0"
    (copy / "residual.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"'lowrank:8,quant=int4'.*written by hf-residual 0.9.0: upgrade"):
        api.apply(copy, llama.cpt, tmp_path / "out", progress=False)
    manifest["codec_params"]["spec"] = "lowrank:8"
    manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["codec"]["kind"] = "vq"
    (copy / "residual.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"stored as 'vq'.*written by hf-residual 0.9.0: upgrade"):
        api.apply(copy, llama.cpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_grown_vocabulary_gets_no_adapter_but_applies(families, tmp_path):
    family = families("llama", "bfloat16", extra_instruct_tokens=8)
    residual = tmp_path / "r"
    api.extract(family.instruct, family.base, residual, codec="lowrank:4", progress=False)
    manifest = json.loads((residual / "residual.json").read_text())
    assert manifest["codec_params"]["peft_adapter"]["written"] is False
    assert not (residual / "adapter_config.json").exists()
    api.apply(residual, family.cpt, tmp_path / "ported", progress=False)
    instruct, ported = load_tensors(family.instruct), load_tensors(tmp_path / "ported")
    rows = load_tensors(family.base)["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ported[name].shape == instruct[name].shape
        assert torch.equal(bits(ported[name][rows:]), bits(instruct[name][rows:])), name  # the new rows
    for name, expected in _reference_rows(family.cpt, residual, rows).items():
        assert torch.equal(bits(ported[name][:rows]), bits(expected)), name


def test_cli_extract_with_codec_and_probe_file(llama, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\n\nName a colour.\n")
    out = tmp_path / "r"
    code = main(
        ["extract", str(llama.instruct), "--base", str(llama.base), "-o", str(out), "-q"]
        + ["--codec", "sparse:topk=0.2", "--probe", str(prompts)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "smaller than bfloat16" in printed and "probe: mean next-token KL" in printed
    probe = json.loads((out / "residual.json").read_text())["fidelity"]["probe"]
    assert probe["prompts"] == 2 and 0 <= probe["mean_kl"] < 0.1
    assert "next-token KL" in (out / "README.md").read_text()


def test_cli_refuses_probe_without_codec_and_unknown_codec(llama, tmp_path, capsys):
    base = ["extract", str(llama.instruct), "--base", str(llama.base), "-o", str(tmp_path / "r"), "-q"]
    assert main([*base, "--probe"]) == 2
    assert "--probe measures a lossy codec" in capsys.readouterr().err
    assert main([*base, "--codec", "jpeg"]) == 2
    assert "unknown codec 'jpeg'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_probe_kl_is_zero_for_an_exact_decoding(llama, tmp_path):
    """energy=1.0 needs full rank, so every matrix is kept dense in bfloat16 (factors would be larger):
    the decoding is R to bfloat16 precision and the KL must be ~0."""
    result = api.extract(
        llama.instruct, llama.base, tmp_path / "r", codec="lowrank:energy=1.0,dtype=float32,embeddings=compress",
        probe=True, progress=False,
    )  # fmt: skip
    assert result.details["fidelity"]["probe"]["mean_kl"] < 1e-6
    assert result.details["fidelity"]["errors"]["max"] < 1e-2
    assert np.isfinite(result.details["fidelity"]["ratio_to_bf16"])


def test_peft_adapter_on_tied_embeddings_with_biases(families, tmp_path):
    """qwen2: tied embeddings (one residual for both) and q/k/v biases, which LoRA cannot hold."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family = families("qwen2", "bfloat16")
    residual = tmp_path / "r"
    api.extract(family.instruct, family.base, residual, codec="lowrank:energy=0.8", progress=False)
    left_out = json.loads((residual / "residual.json").read_text())["codec_params"]["peft_adapter"][
        "left_out"
    ]
    assert "model.layers.0.self_attn.q_proj.bias" in left_out
    target = AutoModelForCausalLM.from_pretrained(family.cpt, dtype=torch.float32)
    merged = PeftModel.from_pretrained(target, residual).merge_and_unload().state_dict()
    cpt = load_tensors(family.cpt)
    for name, values in decoded_tensors(residual):
        expected = cpt[name].float() + (torch.from_numpy(values) if values.ndim == 2 else 0)
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), name
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_lossy_extract_and_apply_need_neither_torch_nor_transformers(llama, tmp_path):
    """The codecs, like the engine, are numpy only: run in a Python where importing torch fails."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from hf_residual import api\n"
        f"api.extract({str(llama.instruct)!r}, {str(llama.base)!r}, {str(tmp_path / 'r')!r}, "
        "codec='lowrank:4', progress=False)\n"
        f"api.apply({str(tmp_path / 'r')!r}, {str(llama.cpt)!r}, {str(tmp_path / 'p')!r}, progress=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "p" / "config.json").is_file()


@pytest.mark.parametrize("wrong", ["architecture", "not a descendant"])
def test_a_wrong_target_is_refused_before_the_residual_is_decoded(
    families, llama, lowrank, tmp_path, monkeypatch, wrong
):
    """The target is checked from the manifest and headers before any stored part is read.

    ``stream.Decoder.open`` (where a block reader starts reading parts) is replaced by a spy that fails the
    test if decoding starts before the refusal.
    """
    from hf_residual.codecs import stream
    from hf_residual.errors import IncompatibleModelsError, NotADescendantError

    def no_decoding(*args, **kwargs):
        raise AssertionError("the residual was decoded before the target was checked")

    monkeypatch.setattr(stream.Decoder, "open", no_decoding)
    if wrong == "architecture":
        target, expected = families("qwen2", "bfloat16").cpt, IncompatibleModelsError
        message = "the target is a 'qwen2' model .* but the residual's base is a 'llama' model"
    else:
        target, expected = tmp_path / "stranger", NotADescendantError
        message = "does not look like a descendant of the base"
        model = load_tensors(llama.cpt)
        noise = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.items()}
        shutil.copytree(llama.cpt, target)
        for file in target.glob("*.safetensors*"):
            file.unlink()
        save_file(noise, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(expected, match=message) as refused:
        api.apply(lowrank, target, tmp_path / "out", progress=False)
    assert type(refused.value) is expected  # NotADescendantError is an IncompatibleModelsError too
    assert not (tmp_path / "out").exists()
