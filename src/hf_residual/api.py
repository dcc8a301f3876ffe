"""The Python API: ``extract``, ``apply``, ``port`` and ``inspect``, each one function.

Each call resolves its inputs, checks that they fit together (architecture, tensor names, shapes,
lineage) before any arithmetic, plans engine jobs, streams them into a staging folder beside the output,
adds tokenizer/config/card files, and renames the folder into place only when everything verified.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual import assets, cards, engine, lineage, plans
from hf_residual.checkpoint import Checkpoint, open_checkpoint
from hf_residual.errors import ConfigError, NotADescendantError
from hf_residual.manifest import (
    CODEC_NOTES,
    CODECS,
    WEIGHTS_PREFIX,
    Manifest,
    ModelIdentity,
    TensorEntry,
    is_residual_folder,
    read_manifest,
)
from hf_residual.output import check_destination, staged_output
from hf_residual.sources import ResolvedModel, resolve

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass
class Result:
    """What a call wrote, for the CLI to render and for callers to inspect."""

    output: Path
    tensors: int
    bytes_written: int
    details: dict = field(default_factory=dict)


def _progress(
    total: int, description: str, enabled: bool
) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=not enabled, leave=False)
    return bar.update, bar.close


def _execute(shards: list[engine.ShardPlan], staging: Path, description: str, progress: bool):
    update, close = _progress(engine.total_bytes(shards), description, progress)
    try:
        return engine.execute(shards, staging, on_progress=update)
    finally:
        close()


def _base_samples(base: Checkpoint) -> dict[str, list[float]]:
    return {name: lineage.sample(info) for name, info in base.tensors.items()}


def _fingerprint(samples: dict[str, list[float]]) -> str:
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
    return f"samples-sha256:{digest[:16]}"


def _check_descendant(target: Checkpoint, base_samples: dict[str, list[float]], force: bool) -> float:
    target_samples = {name: lineage.sample(target.tensors[name]) for name in base_samples}
    distance = lineage.relative_distance(target_samples, base_samples)
    if distance > lineage.MAX_RELATIVE_DISTANCE and not force:
        raise NotADescendantError(
            f"the target ({target.path}) does not look like a descendant of the base: |T - B| / |B| = "
            f"{distance:.2f} on sampled weights (descendants are usually below 0.1; the limit is "
            f"{lineage.MAX_RELATIVE_DISTANCE}). Adding this residual would damage the model. If you are sure, "
            "pass --force"
        )
    return distance


def _identity(
    model: ResolvedModel, checkpoint: Checkpoint, samples: dict[str, list[float]] | None = None
) -> ModelIdentity:
    identity = model.identity
    identity.model_type = checkpoint.model_type
    if samples is not None:
        identity.fingerprint = _fingerprint(samples)
    return identity


def _normalise_dtype(dtype: str) -> str:
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown residual dtype {dtype!r}; choose float32 (lossless) or bfloat16 (half size)"
        ) from None


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"invalid shard size {size!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise ConfigError(f"alpha must be a finite number, got {alpha}")
    return alpha


def extract(
    instruct: str | Path,
    base: str | Path,
    output: str | Path,
    *,
    dtype: str = "bfloat16",
    instruct_revision: str | None = None,
    base_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Result:
    """Write the residual ``instruct - base`` to a residual folder (weights, manifest, tokenizer, card)."""
    codec = _normalise_dtype(dtype)
    output = Path(output)
    check_destination(output.absolute(), overwrite=overwrite)
    instruct_model = resolve(instruct, instruct_revision, role="instruct model")
    base_model = resolve(base, base_revision, role="base model")
    i_ckpt, b_ckpt = open_checkpoint(instruct_model.path), open_checkpoint(base_model.path)
    pairs = plans.pair(i_ckpt, b_ckpt)
    jobs = plans.extract_jobs(pairs, CODECS[codec])
    shards = engine.plan_shards(jobs, WEIGHTS_PREFIX, parse_size(max_shard_size))
    samples = _base_samples(b_ckpt)
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        stats = _execute(shards, staging, "extract", progress)
        engine.write_index(staging, WEIGHTS_PREFIX, shards)
        manifest = Manifest(
            codec=codec,
            base=_identity(base_model, b_ckpt, samples),
            instruct=_identity(instruct_model, i_ckpt),
            model_type=i_ckpt.model_type,
            architectures=list(i_ckpt.config.get("architectures") or []),
            base_vocab_size=b_ckpt.vocab_size,
            instruct_vocab_size=i_ckpt.vocab_size,
            tensors={
                p.name: TensorEntry(
                    shape=list(p.instruct.shape),
                    dtype=CODECS[codec],
                    sha256=stats[p.name].sha256,
                    source_dtype=p.instruct.dtype,
                    absolute_rows_from=p.absolute_rows_from,
                    base_norm=stats[p.name].minus_norm,
                    residual_norm=stats[p.name].result_norm,
                    base_sample=samples[p.name],
                )
                for p in pairs
            },
            note=CODEC_NOTES[codec],
            inexact_elements=sum(s.inexact for s in stats.values()),
        )
        manifest.write(staging)
        assets.copy_chat_assets(instruct_model.path, staging)
        if i_ckpt.config:
            assets.write_json(staging / assets.INSTRUCT_CONFIG, i_ckpt.config)
        (staging / "README.md").write_text(cards.residual_card(manifest))
    return Result(
        output,
        len(jobs),
        engine.total_bytes(shards),
        {"codec": codec, "lossless": manifest.lossless, "inexact_elements": manifest.inexact_elements},
    )


def _write_model_extras(
    staging: Path,
    target: Checkpoint,
    instruct_config: dict,
    vocab_size: int | None,
    chat_source: Path,
    card: str,
) -> None:
    assets.write_json(
        staging / "config.json", assets.output_config(target.config, instruct_config, vocab_size)
    )
    assets.copy_chat_assets(chat_source, staging)
    (staging / "README.md").write_text(card)


def apply(
    residual: str | Path,
    to: str | Path,
    output: str | Path,
    *,
    alpha: float = 1.0,
    revision: str | None = None,
    target_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Write ``target + alpha * residual`` as a complete transformers model folder."""
    alpha = _check_alpha(alpha)
    output = Path(output)
    check_destination(output.absolute(), overwrite=overwrite)
    residual_model = resolve(residual, revision, role="residual")
    target_model = resolve(to, target_revision, role="target model")
    manifest = read_manifest(residual_model.path)
    r_ckpt = open_checkpoint(residual_model.path, prefix=WEIGHTS_PREFIX)
    t_ckpt = open_checkpoint(target_model.path)
    rows = manifest.absolute_rows_from
    plans.check_same_names(
        set(r_ckpt.tensors), set(manifest.tensors), "residual weights", "residual manifest"
    )
    plans.check_target(t_ckpt, plans.base_shapes_of_residual(r_ckpt, rows), manifest.model_type)
    distance = _check_descendant(t_ckpt, {n: e.base_sample for n, e in manifest.tensors.items()}, force)
    jobs = plans.apply_jobs(r_ckpt, rows, t_ckpt, alpha)
    shards = engine.plan_shards(jobs, "model", parse_size(max_shard_size))
    instruct_config = _read_json(residual_model.path / assets.INSTRUCT_CONFIG)
    grown = manifest.instruct_vocab_size if manifest.instruct_vocab_size != manifest.base_vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        _execute(shards, staging, "apply", progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=_identity(target_model, t_ckpt),
            instruct=manifest.instruct,
            base=manifest.base,
            alpha=alpha,
            codec=manifest.codec,
            distance=distance,
        )
        _write_model_extras(staging, t_ckpt, instruct_config, grown, residual_model.path, card)
    return Result(output, len(jobs), engine.total_bytes(shards), {"alpha": alpha, "distance": distance})


def port(
    source: str | Path,
    to: str | Path,
    output: str | Path,
    *,
    base: str | Path | None = None,
    alpha: float = 1.0,
    revision: str | None = None,
    base_revision: str | None = None,
    target_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """``target + alpha * (instruct - base)`` in one pass; ``source`` may also be a residual folder."""
    alpha = _check_alpha(alpha)
    source_model = resolve(source, revision, role="source")
    if is_residual_folder(source_model.path):
        return apply(
            source_model.path,
            to,
            output,
            alpha=alpha,
            target_revision=target_revision,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            force=force,
            progress=progress,
        )
    if base is None:
        raise ConfigError(
            f"{source}: is an instruct model, so its base is needed: pass --base BASE (the model it was "
            "fine-tuned from), or give a residual folder made by hf-residual extract as SOURCE"
        )
    output = Path(output)
    check_destination(output.absolute(), overwrite=overwrite)
    base_model = resolve(base, base_revision, role="base model")
    target_model = resolve(to, target_revision, role="target model")
    i_ckpt, b_ckpt, t_ckpt = (open_checkpoint(m.path) for m in (source_model, base_model, target_model))
    pairs = plans.pair(i_ckpt, b_ckpt)
    plans.check_target(t_ckpt, {n: info.shape for n, info in b_ckpt.tensors.items()}, b_ckpt.model_type)
    samples = _base_samples(b_ckpt)
    distance = _check_descendant(t_ckpt, samples, force)
    jobs = plans.port_jobs(pairs, t_ckpt, alpha)
    shards = engine.plan_shards(jobs, "model", parse_size(max_shard_size))
    grown = i_ckpt.vocab_size if i_ckpt.vocab_size != b_ckpt.vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        _execute(shards, staging, "port", progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=_identity(target_model, t_ckpt),
            instruct=_identity(source_model, i_ckpt),
            base=_identity(base_model, b_ckpt, samples),
            alpha=alpha,
            codec="none (computed in one pass)",
            distance=distance,
        )
        _write_model_extras(staging, t_ckpt, i_ckpt.config, grown, source_model.path, card)
    return Result(output, len(jobs), engine.total_bytes(shards), {"alpha": alpha, "distance": distance})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


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


def inspect(path: str | Path, *, revision: str | None = None) -> Summary:
    """Summarise a model or residual folder; for a residual, ``|R| / |B|`` per layer."""
    model = resolve(path, revision)
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
