"""A local checkpoint folder: its safetensors tensors (lazily, headers only) and its config.

Pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never opened: a folder with only those
is refused with the command that converts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.errors import CorruptCheckpointError, InputNotFoundError, PickledWeightsError
from hf_residual.safetensors_io import TensorInfo, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files in a model folder that are safetensors but not model weights.
NON_MODEL_SAFETENSORS = ("adapter_model.safetensors",)


@dataclass
class Checkpoint:
    """Headers of every weight tensor in a folder, plus its ``config.json`` (empty if absent)."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def vocab_size(self) -> int | None:
        config = self.config.get("text_config", self.config)
        return config.get("vocab_size")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def weight_files(folder: Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a folder: those named by ``<prefix>.safetensors.index.json``, else all."""
    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CorruptCheckpointError(f"{index}: not a valid safetensors index ({error})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InputNotFoundError(
                f"{folder}: the index names shard(s) that are not there: {', '.join(missing[:3])}; "
                "download the missing files again"
            )
        return [folder / n for n in names]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name not in NON_MODEL_SAFETENSORS)
    return [p for p in files if p.name.startswith(prefix)] or files


def open_checkpoint(path: str | Path, prefix: str = "model") -> Checkpoint:
    """Open a folder of safetensors weights; refuse pickle-only folders without unpickling anything."""
    folder = Path(path)
    if not folder.exists():
        raise InputNotFoundError(f"{folder}: no such folder; give a local model folder (or a Hub repo id)")
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: is a file; give the model's folder, not one of its files")
    files = weight_files(folder, prefix)
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise PickledWeightsError(
                f"{folder}: only pickled weights found ({', '.join(pickled[:3])}); hf-residual never "
                "unpickles files (they can run code). Convert them once in a trusted environment, e.g. "
                "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
            )
        raise InputNotFoundError(f"{folder}: no *.safetensors weights found; is this a model folder?")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        file_tensors, _ = read_header(file)
        duplicated = tensors.keys() & file_tensors.keys()
        if duplicated:
            raise CorruptCheckpointError(
                f"{folder}: tensor {sorted(duplicated)[0]!r} is stored in more than one shard"
            )
        tensors.update(file_tensors)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Checkpoint(folder, tensors, config)
