"""Checkpoints saved sharded across processes, made portable: a transformers folder from the shards.

The Trainer under FSDP with ``SHARDED_STATE_DICT`` writes the model with accelerate's ``save_fsdp_model``:
a ``pytorch_model_fsdp_0/`` folder of ``torch.distributed.checkpoint`` (DCP) files, one ``.distcp`` per
rank plus ``.metadata``, keys under ``model.``, and no ``config.json`` or ``model.safetensors`` at all.
DeepSpeed ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` writes ``global_step*/`` partitions.

``consolidate(checkpoint)`` gives a folder the engine reads: the checkpoint itself when it already holds
safetensors (or ``.bin``) weights; otherwise a temporary folder beside it where every tensor was read from
the shards by ``torch.distributed.checkpoint.load`` in this single process (no process group; a batch of
tensors at a time, so memory stays near ``batch_bytes``), written as safetensors shards with an index, and
the config, generation config and tokenizer files copied from the checkpoint (or from the run folder
above it). ZeRO partitions go through DeepSpeed's own ``zero_to_fp32`` converter.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hf_residual.errors import ConfigError, InputNotFoundError

FSDP_PREFIX = "pytorch_model_fsdp_"  # accelerate's FSDP_MODEL_NAME + "_<model_index>"
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")
# files a transformers folder needs besides its weights; the tokenizer files are copied when present
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_BATCH_BYTES = 2 * 1024**3


def has_full_weights(folder: Path) -> bool:
    return any(next(iter(folder.glob(pattern)), None) is not None for pattern in WEIGHT_PATTERNS)


def dcp_folder(checkpoint: Path) -> Path | None:
    """The DCP folder holding the model of ``checkpoint`` (accelerate's layout, or the folder itself)."""
    candidates = sorted(p for p in checkpoint.glob(f"{FSDP_PREFIX}*") if (p / ".metadata").is_file())
    if candidates:
        return candidates[0]  # model_index 0: the model the Trainer trains
    if (checkpoint / ".metadata").is_file() and next(checkpoint.glob("*.distcp"), None) is not None:
        return checkpoint
    return None


def zero_folder(checkpoint: Path) -> Path | None:
    """The DeepSpeed ZeRO partitions of ``checkpoint`` (a ``global_step*`` folder with model states)."""
    for folder in sorted(checkpoint.glob("global_step*")):
        if next(folder.glob("*model_states.pt"), None) is not None:
            return folder
    return None


def kind(checkpoint: str | Path) -> str:
    """``"full"`` (safetensors or .bin weights), ``"dcp"`` (torch distributed checkpoint) or ``"zero"``."""
    checkpoint = Path(checkpoint)
    if has_full_weights(checkpoint):
        return "full"
    if dcp_folder(checkpoint) is not None:
        return "dcp"
    if zero_folder(checkpoint) is not None:
        return "zero"
    return "none"


def is_sharded(checkpoint: str | Path) -> bool:
    path = Path(checkpoint)
    return path.is_dir() and kind(path) in ("dcp", "zero")


def _config_source(checkpoint: Path, config_from: Path | None) -> Path:
    for folder in [config_from, checkpoint, checkpoint.parent]:
        if folder is not None and (Path(folder) / "config.json").is_file():
            return Path(folder)
    raise InputNotFoundError(
        f"{checkpoint} holds sharded weights but no config.json, and neither does {checkpoint.parent}; "
        "copy the model's config.json into the checkpoint (ResidualPortCallback writes it at each save)"
    )


def _canonical_names(config_folder: Path) -> tuple[set[str], set[str]]:
    """(names transformers saves, tied duplicates it leaves out), from the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return kept, every - kept


def _dcp_batches(folder: Path, prefix: str, skip: set[str], batch_bytes: int):
    """(name, tensor) batches read from the DCP files by torch.distributed.checkpoint in one process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    entries = []
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in skip:
            entries.append((key, name, meta))
    if not entries:
        raise InputNotFoundError(f"{folder} holds no model tensors under {prefix!r}")
    batch, size = [], 0
    for entry in entries + [None]:
        if entry is not None:
            _, _, meta = entry
            nbytes = meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()
        if batch and (entry is None or size + nbytes > batch_bytes):
            state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, _, meta in batch}
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
            yield {name: state[key] for key, name, _ in batch}
            batch, size = [], 0
        if entry is not None:
            batch.append(entry)
            size += nbytes


def _zero_batches(checkpoint: Path, skip: set[str]):
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConfigError(
            f"{checkpoint} holds DeepSpeed ZeRO partitions; reading them needs deepspeed installed (its "
            "zero_to_fp32 converter), or set stage3_gather_16bit_weights_on_model_save: true"
        ) from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    yield {name: tensor.contiguous() for name, tensor in state.items() if name not in skip}


def write_safetensors(batches, output: Path) -> list[str]:
    """Write each batch as one safetensors shard (``model-0000k-of-0000n``) plus the index."""
    from safetensors.torch import save_file

    written: list[tuple[Path, dict]] = []
    total = 0
    for i, batch in enumerate(batches):
        path = output / f"part-{i:05d}.safetensors"
        save_file(batch, str(path), metadata={"format": "pt"})
        written.append((path, {name: t.numel() * t.element_size() for name, t in batch.items()}))
        total += sum(written[-1][1].values())
    names = []
    if len(written) == 1:
        written[0][0].rename(output / "model.safetensors")
        return sorted(written[0][1])
    weight_map = {}
    for i, (path, sizes) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(output / final)
        weight_map.update({name: final for name in sizes})
        names.extend(sizes)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(names)


def consolidate_into(
    checkpoint: str | Path,
    output: str | Path,
    *,
    config_from: str | Path | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> Path:
    """Write the sharded ``checkpoint`` as a complete transformers folder ``output`` (must not exist)."""
    checkpoint, output = Path(checkpoint), Path(output)
    found = kind(checkpoint)
    if found not in ("dcp", "zero"):
        raise InputNotFoundError(f"{checkpoint} holds no sharded (DCP or ZeRO) weights to consolidate")
    source = _config_source(checkpoint, Path(config_from) if config_from else None)
    kept, tied = _canonical_names(source)
    output.mkdir(parents=True)
    if found == "dcp":
        folder = dcp_folder(checkpoint)
        prefix = "model." if folder.name.startswith(FSDP_PREFIX) else ""
        batches = _dcp_batches(folder, prefix, tied, batch_bytes)
    else:
        batches = _zero_batches(checkpoint, tied)
    names = write_safetensors(batches, output)
    unknown = sorted(set(names) - kept)
    if unknown:
        raise ConfigError(
            f"{checkpoint}: {len(unknown)} sharded tensor(s) are not in the model of {source / 'config.json'} "
            f"(first: {unknown[0]}); is the config the one of the trained model?"
        )
    for name in SIDE_FILES:
        for folder in (checkpoint, source):
            if (folder / name).is_file():
                shutil.copy2(folder / name, output / name)
                break
    return output


@contextlib.contextmanager
def consolidate(
    checkpoint: str | Path,
    *,
    workdir: str | Path | None = None,
    config_from: str | Path | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> Iterator[Path]:
    """A folder the engine can port: ``checkpoint`` itself, or its shards consolidated for the duration.

    The temporary folder is made in ``workdir`` (default: beside the checkpoint, same disk) and removed
    on exit. Non-folders (Hub ids) and folders with full weights pass through unchanged.
    """
    path = Path(checkpoint)
    if not is_sharded(path):
        yield checkpoint if not path.is_dir() else path
        return
    parent = Path(workdir) if workdir is not None else path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.consolidated-", dir=parent))
    try:
        yield consolidate_into(path, tmp / path.name, config_from=config_from, batch_bytes=batch_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
