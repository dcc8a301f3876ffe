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
from helpers import bits, load_tensors, matches, reference_folders
from hubserver import card
from safetensors.torch import save_file

from hf_residual import api
from hf_residual.core.checkpoint import open_checkpoint, select_weight_files
from hf_residual.errors import IncompatibleModelsError


def _prefix() -> str:
    return f"org/l{uuid.uuid4().hex[:8]}"


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
    assert matches(result.output, reference_folders(llama.cpt, llama.instruct, llama.base))
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
    result = _port_and_check(hub, llama, ids, tmp_path)
    cached = _cached(tmp_path / "hf_home")
    assert not [f for f in cached if "consolidated" in f or f == "params.json"], cached
    assert result.details["weight_files"]["target"].startswith("model.safetensors.index.json (")
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
    assert matches(result.output, reference_folders(single.cpt, single.instruct, single.base))
    assert "model.fp16.safetensors" not in _cached(tmp_path / "hf_home")
    assert "not read: model.fp16.safetensors" in caplog.text
    assert result.details["weight_files"] == dict.fromkeys(
        ("instruct", "base", "target"), "model.safetensors"
    )


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
    assert matches(result.output, reference_folders(llama.cpt, llama.instruct, llama.base))


# --- A multimodal wrapper: the same language model under a prefix, plus a vision tower -----------------


def _wrapper(source: Path, folder: Path, prefix: str = "language_model.", seed: int = 0) -> dict:
    """``source``'s tensors under ``prefix``, plus vision/projector tensors and a llava-style config."""
    from transformers import AutoConfig

    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    tensors = {prefix + k: v for k, v in load_tensors(source).items()}
    extras = {
        "vision_tower.patch_embed.weight": torch.randn(8, 3, 2, 2, generator=gen).to(torch.bfloat16),
        "vision_tower.blocks.0.norm.weight": torch.randn(8, generator=gen).to(torch.bfloat16),
        "multi_modal_projector.linear_1.weight": torch.randn(32, 8, generator=gen).to(torch.bfloat16),
        "vision_tower.position_ids": torch.arange(4, dtype=torch.int64),
    }
    save_file({**tensors, **extras}, folder / "model.safetensors", metadata={"format": "pt"})
    text = AutoConfig.from_pretrained(source).to_dict()
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    return extras


def test_port_onto_a_wrapper_maps_the_prefix_and_copies_the_vision_tower(llama, tmp_path):
    target = tmp_path / "wrapper"
    extras = _wrapper(llama.cpt, target)
    result = api.port(llama.instruct, target, tmp_path / "out", base=llama.base, progress=False)
    expected = {
        "language_model." + k: v for k, v in reference_folders(llama.cpt, llama.instruct, llama.base).items()
    }
    assert matches(result.output, {**expected, **extras})
    assert result.details["target_prefix"] == "language_model."
    assert result.details["copied_from_target"] == sorted(extras)
    assert json.loads((result.output / "config.json").read_text())["model_type"] == "llava"
    readme = (result.output / "README.md").read_text()
    assert "language_model." in readme and "vision_tower.patch_embed.weight" in readme


def test_inconsistent_prefix_is_an_error_listing_names(llama, tmp_path):
    target = tmp_path / "wrapper"
    _wrapper(llama.cpt, target)
    tensors = load_tensors(target)
    tensors["lm_head.weight"] = tensors.pop("language_model.lm_head.weight")  # not under the prefix
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError, match="under the prefix 'language_model.'") as error:
        api.port(llama.instruct, target, tmp_path / "out", base=llama.base, progress=False)
    assert "lm_head.weight" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_wrapper_instruct_onto_bare_target_is_refused(llama, tmp_path):
    """The reverse: instruct and base are the wrapper, the target the bare language model."""
    base, instruct = tmp_path / "base", tmp_path / "instruct"
    _wrapper(llama.base, base)
    _wrapper(llama.instruct, instruct)
    with pytest.raises(IncompatibleModelsError, match="wrap the target's network"):
        api.port(instruct, llama.cpt, tmp_path / "out", base=base, progress=False, force=True)


def test_apply_onto_a_wrapper(llama, tmp_path):
    """A residual (extracted from the text-only pair) applied onto the wrapper: same mapping, same copies."""
    target = tmp_path / "wrapper"
    extras = _wrapper(llama.cpt, target)
    residual = api.extract(llama.instruct, llama.base, tmp_path / "residual", dtype="float32", progress=False)
    result = api.apply(residual.output, target, tmp_path / "out", progress=False)
    expected = {
        "language_model." + k: v for k, v in reference_folders(llama.cpt, llama.instruct, llama.base).items()
    }
    assert matches(result.output, {**expected, **extras})
    assert result.details["copied_from_target"] == sorted(extras)
    assert "vision_tower.patch_embed.weight" in (result.output / "README.md").read_text()


@pytest.mark.parametrize("keep_fp8", [True, False])
def test_fp8_vision_tower_of_a_wrapper_is_copied_with_its_scales_or_dequantized(llama, tmp_path, keep_fp8):
    """An FP8 tensor outside the prefix: codes and scales byte for byte with keep_fp8, else bfloat16."""
    target = tmp_path / "wrapper"
    extras = _wrapper(llama.cpt, target)
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    scale = (weight.abs().max() / 448.0).reshape(1, 1)
    codes = (weight / scale).to(torch.float8_e4m3fn)
    tensors = {
        **load_tensors(target),
        "vision_tower.fc.weight": codes,
        "vision_tower.fc.weight_scale_inv": scale,
    }
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (target / "config.json").write_text(json.dumps(config))
    result = api.port(
        llama.instruct, target, tmp_path / "out", base=llama.base, keep_fp8=keep_fp8, progress=False
    )
    got = load_tensors(result.output)
    expected = {
        "language_model." + k: v for k, v in reference_folders(llama.cpt, llama.instruct, llama.base).items()
    }
    assert all(torch.equal(bits(got[k]), bits(v)) for k, v in {**expected, **extras}.items())
    if keep_fp8:
        assert torch.equal(got["vision_tower.fc.weight"].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(got["vision_tower.fc.weight_scale_inv"], scale)
    else:
        assert "vision_tower.fc.weight_scale_inv" not in got
        assert torch.equal(
            bits(got["vision_tower.fc.weight"]), bits((codes.float() * scale).to(torch.bfloat16))
        )
        assert "quantization_config" not in json.loads((result.output / "config.json").read_text())
