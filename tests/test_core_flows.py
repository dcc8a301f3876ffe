"""End-to-end flows of the core commands on tiny real models, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import bits, load_tensors, reference_port
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hf_residual import api
from hf_residual.toy import ARCHITECTURES


def test_cli_extract_apply_inspect_as_a_user_runs_them(llama, tmp_path):
    exe = [sys.executable, "-m", "hf_residual.cli"]
    residual, out = tmp_path / "residual", tmp_path / "ported"
    done = subprocess.run(
        [
            *exe,
            "extract",
            str(llama.instruct),
            "--base",
            str(llama.base),
            "-o",
            str(residual),
            "--max-shard-size",
            "40KB",
            "-q",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote residual" in done.stdout and "lossy" in done.stdout
    names = {p.name for p in residual.iterdir()}
    assert {
        "residual.json",
        "residual.safetensors.index.json",
        "README.md",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= names
    manifest = json.loads((residual / "residual.json").read_text())
    assert manifest["format_version"] == 1 and manifest["model_type"] == "llama"
    assert manifest["tool_version"] and manifest["codec"] == "bfloat16"
    assert len(manifest["tensors"]) == len(load_tensors(llama.base))
    assert all(len(e["sha256"]) == 64 for e in manifest["tensors"].values())
    done = subprocess.run(
        [*exe, "apply", str(residual), "--to", str(llama.cpt), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote model" in done.stdout
    # The values: R = I - B rounded once to bfloat16, and the model T + R in float32, rounded once.
    t, i, b = (load_tensors(p) for p in (llama.cpt, llama.instruct, llama.base))
    r, ported = load_tensors(residual), load_tensors(out)
    assert r.keys() == ported.keys() == t.keys()
    for name in t:
        assert torch.equal(bits(r[name]), bits((i[name].float() - b[name].float()).to(torch.bfloat16))), name
        assert torch.equal(bits(ported[name]), bits((t[name].float() + r[name].float()).to(t[name].dtype))), (
            name
        )
    done = subprocess.run(
        [*exe, "inspect", str(residual), str(out)], capture_output=True, text=True, check=True
    )
    assert (
        "[residual, llama]" in done.stdout and "layer   1" in done.stdout and "[model, llama]" in done.stdout
    )


def test_manifest_checksums_match_written_bytes(llama, tmp_path):
    import hashlib

    from hf_residual.core.checkpoint import open_checkpoint

    api.extract(llama.instruct, llama.base, tmp_path / "r", progress=False)
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    ckpt = open_checkpoint(tmp_path / "r", prefix="residual")
    for name, info in ckpt.tensors.items():
        with open(info.file, "rb") as handle:
            handle.seek(info.offset)
            assert hashlib.sha256(handle.read(info.nbytes)).hexdigest() == manifest["tensors"][name]["sha256"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ported_model_loads_and_chats(families, tmp_path, arch):
    fam = families(arch, "bfloat16")
    api.port(fam.instruct, fam.cpt, tmp_path / "out", base=fam.base, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|assistant|>")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert generation.eos_token_id == [3, 2]  # the instruct side's eos ids, not the target's
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == json.loads((fam.instruct / "config.json").read_text())["eos_token_id"]


def test_tied_embeddings_stay_tied(families, tmp_path):
    fam = families("qwen2", "bfloat16")
    assert "lm_head.weight" not in load_tensors(fam.base)
    api.port(fam.instruct, fam.cpt, tmp_path / "out", base=fam.base, progress=False)
    assert "lm_head.weight" not in load_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_instruct_with_added_tokens(families, tmp_path):
    fam = families("mistral", "bfloat16", extra_instruct_tokens=8)
    base, instruct, cpt = (load_tensors(p) for p in (fam.base, fam.instruct, fam.cpt))
    rows = base["model.embed_tokens.weight"].shape[0]
    assert instruct["model.embed_tokens.weight"].shape[0] == rows + 8
    api.extract(fam.instruct, fam.base, tmp_path / "r", dtype="float32", progress=False)
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    assert manifest["tensors"]["model.embed_tokens.weight"]["absolute_rows_from"] == rows
    for route in ("port", "apply"):
        out = tmp_path / route
        if route == "port":
            api.port(fam.instruct, fam.cpt, out, base=fam.base, progress=False)
        else:
            api.apply(tmp_path / "r", fam.cpt, out, progress=False)
        ported = load_tensors(out)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ported[name].shape[0] == rows + 8
            assert torch.equal(bits(ported[name][rows:]), bits(instruct[name][rows:])), (route, name)
            expected = (cpt[name].float() + (instruct[name][:rows].float() - base[name].float())).to(
                torch.bfloat16
            )
            assert torch.equal(bits(ported[name][:rows]), bits(expected)), (route, name)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == rows + 8
        AutoModelForCausalLM.from_pretrained(out)


def test_port_accepts_a_residual_folder_as_source(llama, tmp_path):
    api.extract(llama.instruct, llama.base, tmp_path / "r", dtype="float32", progress=False)
    api.port(tmp_path / "r", llama.cpt, tmp_path / "a", progress=False)
    a, t = load_tensors(tmp_path / "a"), load_tensors(llama.cpt)
    i, b = load_tensors(llama.instruct), load_tensors(llama.base)
    assert a.keys() == t.keys()
    for name in t:  # T + R with the float32 R = I - B: the float32 reference, bit for bit
        assert torch.equal(bits(a[name]), bits(reference_port(t[name], i[name], b[name], 1.0))), name


def test_alpha_zero_gives_back_the_target(llama, tmp_path):
    api.port(llama.instruct, llama.cpt, tmp_path / "out", base=llama.base, alpha=0.0, progress=False)
    out, cpt = load_tensors(tmp_path / "out"), load_tensors(llama.cpt)
    assert all(torch.equal(bits(out[k]), bits(cpt[k])) for k in cpt)


def test_residual_card_records_lineage(llama, tmp_path):
    import yaml

    api.extract(llama.instruct, llama.base, tmp_path / "r", progress=False)
    card = (tmp_path / "r" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # Local parents have no repo id: no base_model, and so no relation (the Hub refuses one alone).
    assert "base_model" not in front and "base_model_relation" not in front
    assert "instruction-residual" in front["tags"]
    assert str(llama.instruct.name) in card and str(llama.base.name) in card
    assert "hf-residual apply" in card and "lossy" in card


def test_engine_import_is_light():
    code = (
        "import sys, pkgutil, importlib, hf_residual.core; import hf_residual.api; "
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(hf_residual.core.__path__, 'hf_residual.core.')]; "
        "heavy = [m for m in ('transformers', 'huggingface_hub', 'lm_eval', 'torch') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_explains_commands():
    done = subprocess.run(
        [sys.executable, "-m", "hf_residual.cli", "port", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for word in ("SOURCE", "--to", "--base", "--alpha", "--overwrite", "residual folder"):
        assert word in done.stdout
