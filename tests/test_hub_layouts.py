"""The Hub's real repo layouts: other namings beside the transformers weights, several variants, and a
multimodal wrapper whose language model is the same network under a prefix.

Repos are built from tiny transformers models saved with ``save_pretrained`` and served by the local Hub;
ports are checked bit for bit against the independent float32 reference (``helpers.reference_port``).
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors, reference_port
from hubserver import card
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.checkpoint import open_checkpoint, select_weight_files


def _prefix() -> str:
    return f"org/l{uuid.uuid4().hex[:8]}"


def _matches(folder: Path, expected: dict[str, torch.Tensor]) -> bool:
    got = load_tensors(folder)
    return got.keys() == expected.keys() and all(
        got[k].dtype == expected[k].dtype and torch.equal(bits(got[k]), bits(expected[k])) for k in expected
    )


def _reference(target: Path, instruct: Path, base: Path) -> dict[str, torch.Tensor]:
    t, i, b = load_tensors(target), load_tensors(instruct), load_tensors(base)
    return {name: reference_port(t[name], i[name], b[name], 1.0) for name in t}


def _cached(cache: Path) -> list[str]:
    """Every file in the HF cache's snapshots, relative to its snapshot (what was downloaded)."""
    found = []
    for snapshot in cache.glob("hub/models--*/snapshots/*"):
        found += [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    assert found, f"nothing cached under {cache}"
    return sorted(found)


def _mistral_native(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Mistral's own names, as ``consolidated.safetensors`` stores them."""
    renames = {
        "model.embed_tokens.": "tok_embeddings.",
        "model.norm.": "norm.",
        "lm_head.": "output.",
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "model.layers.": "layers.",
    }
    out = {}
    for name, value in tensors.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = value.clone()
    return out


def _pth(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def _add_family(hub, family, prefix: str, extra) -> dict[str, str]:
    """Publish base, instruct and CPT with ``extra(folder) -> {path: bytes}`` added to each repo."""
    ids = {role: f"{prefix}-{role}" for role in ("base", "instruct", "cpt")}
    for role in ids:
        folder = getattr(family, role)
        readme = {"README.md": card(ids["base"] if role != "base" else None)}
        hub.add_repo(ids[role], folder, files={**readme, **extra(folder)})
    return ids


def _port_and_check(hub, llama, ids, tmp_path) -> api.Result:
    result = api.port(ids["instruct"], ids["cpt"], tmp_path / "out", progress=False)
    assert _matches(result.output, _reference(llama.cpt, llama.instruct, llama.base))
    return result


def test_mistral_layout_reads_only_the_transformers_shards(hub, llama, tmp_path):
    """consolidated.safetensors (Mistral's names) beside the shards and index: never downloaded or read."""

    def extra(folder: Path) -> dict[str, bytes]:
        save_file(_mistral_native(load_tensors(folder)), tmp_path / "consolidated.safetensors")
        return {
            "consolidated.safetensors": (tmp_path / "consolidated.safetensors").read_bytes(),
            "params.json": json.dumps({"dim": 32, "n_layers": 2}).encode(),
        }

    ids = _add_family(hub, llama, _prefix(), extra)
    _port_and_check(hub, llama, ids, tmp_path)
    cached = _cached(tmp_path / "hf_home")
    assert not [f for f in cached if "consolidated" in f or f == "params.json"], cached
    assert any(f.endswith(".safetensors.index.json") for f in cached)


def test_llama_layout_with_original_pth_is_not_refused(hub, llama, tmp_path):
    """original/consolidated.00.pth (a real torch.save pickle) beside the safetensors: ignored."""

    def extra(folder: Path) -> dict[str, bytes]:
        return {
            "original/consolidated.00.pth": _pth(_mistral_native(load_tensors(folder))),
            "original/params.json": b'{"dim": 32}',
            "original/tokenizer.model": b"\0" * 64,
        }

    ids = _add_family(hub, llama, _prefix(), extra)
    _port_and_check(hub, llama, ids, tmp_path)
    cached = _cached(tmp_path / "hf_home")
    assert not [f for f in cached if f.endswith(".pth") or f.startswith("original/")], cached


def test_index_first_when_a_repo_also_holds_a_single_file_copy(hub, llama, tmp_path):
    """Shards + index, plus a stray model.safetensors (different weights): the index decides."""

    def extra(folder: Path) -> dict[str, bytes]:
        scaled = {k: (v.float() * 2).to(v.dtype) for k, v in load_tensors(folder).items()}
        save_file(scaled, tmp_path / "model.safetensors", metadata={"format": "pt"})
        return {"model.safetensors": (tmp_path / "model.safetensors").read_bytes()}

    ids = _add_family(hub, llama, _prefix(), extra)
    _port_and_check(hub, llama, ids, tmp_path)
    assert "model.safetensors" not in _cached(tmp_path / "hf_home")


def test_variants_choose_model_safetensors_and_say_so(families, hub, tmp_path, caplog):
    """model.safetensors plus model.fp16.safetensors: model.safetensors is read, fp16 never fetched."""
    single = families("llama", "bfloat16")
    assert (single.base / "model.safetensors").is_file()

    def extra(folder: Path) -> dict[str, bytes]:
        half = {k: (v.float() * 3).to(torch.float16) for k, v in load_tensors(folder).items()}
        save_file(half, tmp_path / "model.fp16.safetensors", metadata={"format": "pt"})
        return {"model.fp16.safetensors": (tmp_path / "model.fp16.safetensors").read_bytes()}

    ids = _add_family(hub, single, _prefix(), extra)
    with caplog.at_level("INFO", logger="hf_residual"):
        result = api.port(ids["instruct"], ids["cpt"], tmp_path / "out", progress=False)
    assert _matches(result.output, _reference(single.cpt, single.instruct, single.base))
    assert "model.fp16.safetensors" not in _cached(tmp_path / "hf_home")
    assert "not read: model.fp16.safetensors" in caplog.text


def test_selection_rule():
    def index(name: str) -> dict:
        return {"weight_map": {"a": name.replace(".safetensors.index.json", "-1.safetensors")}}

    names = [
        "model.safetensors",
        "model.fp16.safetensors",
        "consolidated.safetensors",
        "original/consolidated.00.pth",
        "adapter_model.safetensors",
    ]
    chosen = select_weight_files(names)
    assert chosen.files == ("model.safetensors",) and chosen.index is None
    assert chosen.unused == ("consolidated.safetensors", "model.fp16.safetensors")
    chosen = select_weight_files([*names, "model.safetensors.index.json"], read_index=index)
    assert chosen.files == ("model-1.safetensors",) and chosen.index == "model.safetensors.index.json"
    assert "model.safetensors" in chosen.unused
    # Variants only: an index first, then files, each the first in name order.
    chosen = select_weight_files(
        ["model.fp16.safetensors", "model.bf16.safetensors", "model.fp16.safetensors.index.json"],
        read_index=index,
    )
    assert chosen.index == "model.fp16.safetensors.index.json"
    assert select_weight_files(["model.fp16.safetensors", "model.bf16.safetensors"]).files == (
        "model.bf16.safetensors",
    )
    assert select_weight_files(
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    ).files == (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    )
    assert select_weight_files(["weights.safetensors"]).files == ("weights.safetensors",)
    assert select_weight_files(["original/x.safetensors", "pytorch_model.bin"]).files == ()


def test_local_folder_with_variants_reads_one(families, tmp_path):
    """The same rule on a local folder: before, both files were read and the tensors clashed."""
    single = families("llama", "bfloat16")
    folder = tmp_path / "m"
    folder.mkdir()
    for file in single.base.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    save_file(load_tensors(single.base), folder / "model.fp16.safetensors")
    ckpt = open_checkpoint(folder)
    assert ckpt.weights.files == ("model.safetensors",)
    assert {t.file.name for t in ckpt.tensors.values()} == {"model.safetensors"}


@pytest.fixture
def no_pickle_loading(monkeypatch):
    """Any torch.load / pickle.load while porting is a failure."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_local_llama_layout_never_unpickles(llama, tmp_path, no_pickle_loading):
    folders = {}
    for role in ("base", "instruct", "cpt"):
        src = getattr(llama, role)
        folder = tmp_path / role
        folder.mkdir()
        for file in src.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        (folder / "original").mkdir()
        (folder / "original" / "consolidated.00.pth").write_bytes(b"\x80\x04not really a pickle")
        folders[role] = folder
    result = api.port(
        folders["instruct"], folders["cpt"], tmp_path / "out", base=folders["base"], progress=False
    )
    assert _matches(result.output, _reference(llama.cpt, llama.instruct, llama.base))
