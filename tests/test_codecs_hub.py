"""Compressed residuals on the local Hub (olah + the upload test double of tests/hubserver): published with
``extract --codec ... --push-to``, then read back by ``port REPO --to`` and by ``PeftModel.from_pretrained``
with the repo id, as users of a published lowrank residual do.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from helpers import bits, check_decoded_residual, load_tensors
from hubserver import add_family

from hf_residual.cli import main
from hf_residual.codecs.folders import decoded_tensors

TOKEN = "hf_localTestToken0123456789"


def test_lowrank_residual_pushed_then_ported_and_loaded_by_peft_from_the_repo(
    hub, llama, tmp_path, capsys, monkeypatch
):
    from huggingface_hub import ModelCard, snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hub.add_token(TOKEN, "tester", {"org"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ids = add_family(hub, llama, f"org/c{uuid.uuid4().hex[:8]}")
    repo = f"tester/residual-lowrank-{uuid.uuid4().hex[:6]}"
    code = main(["extract", ids["instruct"], "--codec", "lowrank:8", "--push-to", repo, "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "smaller than bfloat16" in out and "commit:" in out
    assert hub.commit_count(repo) == 2  # the repo's initial commit, then exactly one upload

    snapshot = Path(snapshot_download(repo))
    assert {"residual.json", "adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in snapshot.iterdir()
    }
    manifest = json.loads((snapshot / "residual.json").read_text())
    assert manifest["codec"] == "lowrank" and manifest["fidelity"]["ratio_to_bf16"] > 1
    card = ModelCard.load(repo)
    assert "lowrank:8" in card.text and f"hf-residual apply {repo}" in card.text

    # port REPO --to CPT decodes the published residual: T + decode(R), rounded once to bf16.
    ported = tmp_path / "ported"
    assert main(["port", repo, "--to", ids["cpt"], "-o", str(ported), "-q"]) == 0, capsys.readouterr().err
    got, cpt = load_tensors(ported), load_tensors(llama.cpt)
    decoded = dict(decoded_tensors(snapshot))
    assert decoded.keys() == cpt.keys() == got.keys()
    check_decoded_residual(snapshot, llama, min_cosine=0.6, rank=8)  # the published residual is I - B's
    for name, values in decoded.items():
        expected = (cpt[name].float() + torch.from_numpy(values)).to(cpt[name].dtype)
        assert torch.equal(bits(got[name]), bits(expected)), name
    assert "lowrank:8" in (ported / "README.md").read_text()

    # PEFT reads the adapter straight from the repo id and merges the matrices. peft asks
    # huggingface_hub's module-level HfApi, whose endpoint was fixed at import: point it at the local Hub.
    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    target = AutoModelForCausalLM.from_pretrained(llama.cpt, dtype=torch.float32)
    merged = PeftModel.from_pretrained(target, repo).merge_and_unload().state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(
        merged[name], cpt[name].float() + torch.from_numpy(decoded[name]), atol=1e-6, rtol=0
    )
