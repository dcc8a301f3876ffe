"""``inspect``: a summary of a model or residual folder (or Hub repo); for a residual, ``|R| / |B|`` per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.manifest import WEIGHTS_PREFIX, Manifest, is_residual_folder, read_manifest
from hf_residual.hub.sources import resolve


@dataclass
class Summary:
    """What ``inspect`` reports about one folder."""

    path: Path
    kind: str
    tensors: int
    bytes: int
    dtypes: dict[str, int]
    model_type: str | None
    layer_norms: dict[str, float] = field(default_factory=dict)
    manifest: Manifest | None = None


def _layer_key(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return f"layer {int(parts[i + 1]):3d}"
    return parts[-2] if len(parts) > 1 else name


def inspect(path: str | Path, *, revision: str | None = None, token: str | None = None) -> Summary:
    """Summarise a model or residual folder (or Hub repo); for a residual, ``|R| / |B|`` per layer."""
    model = resolve(path, revision, token=token)
    residual = is_residual_folder(model.path)
    manifest = read_manifest(model.path) if residual else None
    ckpt = open_checkpoint(model.path, prefix=WEIGHTS_PREFIX if residual else "model")
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    layer_norms: dict[str, float] = {}
    if manifest is not None:
        sums: dict[str, list[float]] = {}
        for name, entry in manifest.tensors.items():
            acc = sums.setdefault(_layer_key(name), [0.0, 0.0])
            acc[0] += entry.residual_norm**2
            acc[1] += entry.base_norm**2
        layer_norms = {k: (r / b) ** 0.5 if b else float("nan") for k, (r, b) in sorted(sums.items())}
    return Summary(
        path=model.path,
        kind="residual" if residual else "model",
        tensors=len(ckpt.tensors),
        bytes=ckpt.total_bytes,
        dtypes=dtypes,
        model_type=manifest.model_type if manifest else ckpt.model_type,
        layer_norms=layer_norms,
        manifest=manifest,
    )
