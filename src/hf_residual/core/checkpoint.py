"""A local checkpoint folder: its safetensors tensors (lazily, headers only) and its config.

Pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never opened: a folder with only those
is refused with the command that converts it. FP8 weights with block scales are read through their scales
(``fp8.attach_scales``: the ``weight_scale_inv`` tensors are consumed, not listed as weights); other
quantized formats (GPTQ, AWQ, bitsandbytes, GGUF, ...) are refused, naming the format (see ``fp8``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.core import fp8
from hf_residual.core.safetensors_io import TensorInfo, read_header
from hf_residual.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    InputNotFoundError,
    PickledWeightsError,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
LOG = logging.getLogger(__name__)
# Files in a model folder that are safetensors but not model weights.
NON_MODEL_SAFETENSORS = ("adapter_model.safetensors",)


@dataclass
class Checkpoint:
    """Headers of every weight tensor in a folder, plus its ``config.json`` (empty if absent)."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)
    weights: WeightSelection | None = None  # which files were read, for details and logs
    # Set on a view of a multimodal wrapper's language model (``names.align_target``): the prefix its
    # tensors have in the files; ``model_type`` is then the language model's (``text_config``).
    prefix: str = ""

    @property
    def model_type(self) -> str | None:
        if self.prefix:
            return self.config.get("text_config", {}).get("model_type")
        return self.config.get("model_type")

    @property
    def vocab_size(self) -> int | None:
        config = self.config.get("text_config", self.config)
        return config.get("vocab_size")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class WeightSelection:
    """The safetensors files a job reads (relative names), and in words which ones and why."""

    files: tuple[str, ...]
    index: str | None = None
    unused: tuple[str, ...] = ()

    def describe(self) -> str:
        """E.g. ``model.safetensors.index.json (3 shards); not read: consolidated.safetensors``."""
        if self.index:
            text = f"{self.index} ({len(self.files)} shard{'s' if len(self.files) != 1 else ''})"
        else:
            text = ", ".join(self.files) or "no weights"
        return text + (f"; not read: {', '.join(self.unused)}" if self.unused else "")


def _variant(name: str, prefix: str, suffix: str) -> bool:
    """``<prefix>.<variant><suffix>``, e.g. ``model.fp16.safetensors``."""
    middle = name.removeprefix(prefix + ".").removesuffix(suffix)
    return name.startswith(prefix + ".") and name.endswith(suffix) and middle and "." not in middle


def select_weight_files(
    names: Iterable[str], prefix: str = "model", read_index: Callable[[str], dict] | None = None
) -> WeightSelection:
    """The one rule, for a local folder and a Hub repo alike, choosing the weights among ``names``.

    Only top-level files count (``original/*.pth`` and other subfolders are never read). In order:
    ``<prefix>.safetensors.index.json`` (the shards it names), ``<prefix>.safetensors``, unindexed
    ``<prefix>-NNNNN-of-NNNNN.safetensors`` shards, the first variant index then the first variant file
    (``<prefix>.fp16.safetensors``...) in name order; else every ``*.safetensors`` file. Other weight files
    (``consolidated.safetensors``, other variants) are listed as unused. ``read_index(name)`` returns the
    parsed index JSON.
    """
    top = sorted(n for n in names if "/" not in n)
    candidates = [
        n for n in top if n.endswith((SAFETENSORS, INDEX_SUFFIX)) and n not in NON_MODEL_SAFETENSORS
    ]
    index_name = f"{prefix}{INDEX_SUFFIX}"
    shard = re.compile(re.escape(prefix) + r"-\d+-of-\d+" + re.escape(SAFETENSORS))
    variant_indexes = [n for n in candidates if _variant(n, prefix, INDEX_SUFFIX)]
    variant_files = [n for n in candidates if _variant(n, prefix, SAFETENSORS)]
    index = files = None
    if index_name in candidates:
        index = index_name
    elif f"{prefix}{SAFETENSORS}" in candidates:
        files = [f"{prefix}{SAFETENSORS}"]
    elif any(shard.fullmatch(n) for n in candidates):
        files = [n for n in candidates if shard.fullmatch(n)]
    elif variant_indexes:
        index = variant_indexes[0]
    elif variant_files:
        files = variant_files[:1]
    else:
        files = [n for n in candidates if n.endswith(SAFETENSORS)]
    if index is not None:
        data = read_index(index) if read_index else {}
        try:
            files = sorted(set(data["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as error:
            raise CorruptCheckpointError(
                f"{index}: not a valid safetensors index (no weight_map: {error})"
            ) from None
    used = {*files, *([index] if index else [])}
    unused = tuple(n for n in candidates if n not in used)
    return WeightSelection(tuple(files), index, unused)


def weight_files(folder: Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a folder, chosen by ``select_weight_files``."""
    return [folder / n for n in weight_selection(folder, prefix).files]


def weight_selection(folder: Path, prefix: str = "model") -> WeightSelection:
    """``select_weight_files`` on a local folder; shards an index names must all be there."""

    def read_index(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(
                f"{folder / name}: not a valid safetensors index ({error})"
            ) from None

    selection = select_weight_files((p.name for p in folder.iterdir() if p.is_file()), prefix, read_index)
    missing = [n for n in selection.files if not (folder / n).is_file()]
    if missing:
        raise InputNotFoundError(
            f"{folder}: the index names shard(s) that are not there: {', '.join(missing[:3])}; "
            "download the missing files again"
        )
    return selection


def open_checkpoint(path: str | Path, prefix: str = "model") -> Checkpoint:
    """Open a folder of safetensors weights; refuse pickle-only folders without unpickling anything."""
    folder = Path(path)
    if not folder.exists():
        raise InputNotFoundError(f"{folder}: no such folder; give a local model folder (or a Hub repo id)")
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: is a file; give the model's folder, not one of its files")
    selection = weight_selection(folder, prefix)
    files = [folder / n for n in selection.files]
    if not files:
        gguf = sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf")
        if gguf:
            raise IncompatibleModelsError(fp8.gguf_message(folder, gguf))
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
    if selection.unused:
        LOG.info("%s: reading %s", folder, selection.describe())
    fp8.refuse_other_quantization(folder, config, tensors)
    return Checkpoint(folder, fp8.attach_scales(folder, tensors, config), config, selection)
