"""Load a corpus (a saved ``datasets`` folder, or text/JSON lines/parquet files) and mix in replay."""

from __future__ import annotations

import glob
from pathlib import Path

from hf_residual.errors import ConfigError, InputNotFoundError

_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _files(spec: str | list[str]) -> list[str]:
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        files.extend(matched)
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise InputNotFoundError(
            f"corpus file(s) not found: {', '.join(missing or patterns)}; give a saved datasets folder "
            "(hf-residual corpus -o DIR) or existing .txt/.jsonl/.parquet files"
        )
    return files


def load_corpus(spec: str | list[str]):
    """A ``datasets.Dataset``: ``load_from_disk`` for a saved folder, else files (one .txt = one document)."""
    import datasets

    if isinstance(spec, str) and Path(spec).is_dir():
        parquet = sorted(str(f) for f in Path(spec).glob("*.parquet"))
        if parquet and not (Path(spec) / "dataset_info.json").exists():
            return datasets.load_dataset("parquet", data_files=parquet, split="train")
        loaded = datasets.load_from_disk(spec)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(f"{spec} holds splits {list(loaded)} but no 'train' split to train on")
            loaded = loaded["train"]
        return loaded
    files = _files(spec)
    kinds = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"corpus files must all be one of {', '.join(_FILE_BUILDERS)} (got {', '.join(files)})"
        )
    kind = kinds.pop()
    extra = {"sample_by": "document"} if kind == "text" else {}
    return datasets.load_dataset(kind, data_files=files, split="train", **extra)


def mix_replay(new, old, share: float, seed: int):
    """New documents with a ``share`` of old ones interleaved (stops when the new data runs out)."""
    from datasets import interleave_datasets

    return interleave_datasets(
        [new, old], probabilities=[1 - share, share], seed=seed, stopping_strategy="first_exhausted"
    )
