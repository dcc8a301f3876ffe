"""Write a lowrank residual also as a PEFT LoRA adapter, so ``PeftModel.from_pretrained`` applies it.

Each weight matrix ``R ~ B @ A`` becomes ``lora_A = A``, ``lora_B = B`` with scaling 1 (``lora_alpha`` =
rank per module via ``rank_pattern``/``alpha_pattern``). Embeddings kept dense are written exactly as a
full-rank pair (``R = R @ I``); PEFT's embedding layout is ``delta = (lora_embedding_B @
lora_embedding_A).T``. LoRA cannot hold 1-D residuals (norms, biases): those are left out and listed
in the manifest, so ``merge_and_unload()`` equals ``hf-residual apply`` on every matrix, while the
1-D tensors keep the target's values. A residual whose instruct model grew its vocabulary gets no adapter.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from hf_residual.codecs.store import NUMPY_DTYPES, ShardWriter, as_stored
from hf_residual.core.manifest import Manifest
from hf_residual.core.safetensors_io import TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDING_SUFFIXES = ("embed_tokens", "wte", "word_embeddings", "embed_in")


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_SUFFIXES


def _raw(info: TensorInfo) -> tuple[str, np.ndarray]:
    """A stored tensor as (safetensors dtype, array of its raw values): bfloat16 stays as its bits."""
    numpy_dtype = np.uint16 if info.dtype == "BF16" else NUMPY_DTYPES[info.dtype]
    raw = np.fromfile(info.file, dtype=numpy_dtype, count=info.numel, offset=info.offset)
    return info.dtype, raw.reshape(info.shape)


def _target_modules(modules: list[str], all_modules: list[str]) -> list[str]:
    """Module suffixes (``q_proj``) when each suffix names only adapted modules, else full names."""
    chosen = set(modules)
    suffixes = {m.rsplit(".", 1)[-1] for m in modules}
    exact = all(m in chosen for m in all_modules if m.rsplit(".", 1)[-1] in suffixes)
    return sorted(suffixes) if exact else sorted(modules)


def write(folder: Path, manifest: Manifest, tensors: dict[str, TensorInfo]) -> dict:
    """Write adapter_config.json and adapter_model.safetensors from an encoded lowrank folder.

    numpy only (bfloat16 parts are copied as their bits): writing the adapter needs neither torch nor peft.
    """
    if any(e.absolute_rows_from is not None for e in manifest.tensors.values()):
        return {"written": False, "reason": "the instruct model grew its vocabulary; PEFT cannot add rows"}
    writer = ShardWriter(folder, WEIGHTS_NAME.removesuffix(".safetensors"), max_bytes=1 << 62)
    ranks: dict[str, int] = {}
    left_out: list[str] = []
    for name, entry in sorted(manifest.tensors.items()):
        module = _module(name)
        kind = (entry.codec or {}).get("kind")
        if kind == "lowrank":
            (b_dtype, b), (a_dtype, a) = _raw(tensors[f"{name}.lora_B"]), _raw(tensors[f"{name}.lora_A"])
        elif len(entry.shape) == 2 and name.endswith(".weight"):
            b_dtype, b = _raw(tensors[name])
            a_dtype, a = b_dtype, as_stored(b_dtype, np.eye(entry.shape[1], dtype=np.float32))
        else:
            left_out.append(name)
            continue
        key = f"base_model.model.{module}"
        if _is_embedding(module):
            writer.add(f"{key}.lora_embedding_A", b_dtype, np.ascontiguousarray(b.T))
            writer.add(f"{key}.lora_embedding_B", a_dtype, np.ascontiguousarray(a.T))
        else:
            writer.add(f"{key}.lora_A.weight", a_dtype, a)
            writer.add(f"{key}.lora_B.weight", b_dtype, b)
        ranks[module] = int(a.shape[0])
    writer.close()
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    modules = sorted(ranks)
    all_modules = [_module(n) for n in manifest.tensors]
    pattern = {m: r for m, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": manifest.base.repo_id or manifest.base.name,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(modules, all_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }  # no "ensure_weight_tying" for tied models: peft 0.21 then merges the residual twice (docs/CODECS.md)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return {
        "written": True,
        "modules": len(modules),
        "bytes": (folder / WEIGHTS_NAME).stat().st_size,
        "left_out": left_out,
    }


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "write"]
