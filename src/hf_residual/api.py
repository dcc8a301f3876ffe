"""The Python API: ``extract``, ``apply``, ``port`` and ``inspect``, each one function.

Each call resolves its inputs, checks that they fit together (architecture, tensor names, shapes,
lineage) before any arithmetic, plans engine jobs, streams them into a staging folder beside the output,
adds tokenizer/config/card files, and renames the folder into place only when everything verified.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual import assets, cards, engine, fp8, hub, hub_base, hub_publish, lineage, names, plans, vocab
from hf_residual.checkpoint import Checkpoint, open_checkpoint
from hf_residual.codecs import folders as codec_folders
from hf_residual.codecs import registry as codec_registry
from hf_residual.errors import ConfigError, IncompatibleModelsError, NotADescendantError
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
from hf_residual.safetensors_io import FLOAT_DTYPES
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


def _execute(
    shards: list[engine.ShardPlan],
    staging: Path,
    description: str,
    progress: bool,
    checksum: str | None = None,
):
    update, close = _progress(engine.total_bytes(shards), description, progress)
    try:
        return engine.execute(shards, staging, checksum=checksum, on_progress=update)
    finally:
        close()


def _base_samples(base: Checkpoint) -> dict[str, list[float]]:
    """The lineage sample of every floating-point tensor (integer/bool buffers are not weights)."""
    return {
        name: lineage.sample(info)
        for name, info in base.tensors.items()
        if info.dtype in FLOAT_DTYPES or fp8.is_scaled(info)
    }


def _fingerprint(samples: dict[str, list[float]]) -> str:
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
    return f"samples-sha256:{digest[:16]}"


def _check_descendant(
    target: Checkpoint,
    base_samples: dict[str, list[float]],
    force: bool,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> float:
    """Refuse a target that does not descend from the base; return the median distance per matrix.

    The target is sampled where the base was (the count of each stored sample gives the positions, so the
    16-element samples of older manifests still work); see ``lineage`` for what is measured.
    ``base_shapes``: a target with a grown vocabulary is sampled within the base's rows.
    """
    within = {n: math.prod(s) for n, s in (base_shapes or {}).items()}
    target_samples = {
        name: lineage.sample(target.tensors[name], len(values), within.get(name))
        for name, values in base_samples.items()
    }
    ndim = {name: len(target.tensors[name].shape) for name in base_samples}
    distance = lineage.relative_distance(target_samples, base_samples, ndim)
    if distance.matrices > lineage.MAX_RELATIVE_DISTANCE and not force:
        raise NotADescendantError(
            f"the target ({target.path}) does not look like a descendant of the base: {distance.describe()}. "
            "Continued pre-training and fine-tunes measured 0.03-0.4; a model of the same shape trained "
            f"apart from the base gives 1.0-1.5; the limit is {lineage.MAX_RELATIVE_DISTANCE}. Adding this "
            "residual would damage the model. If you are sure, pass --force"
        )
    return distance.matrices


def _check_residual_not_zero(ratio: float, force: bool, instruct: str, base: str) -> None:
    """Refuse a residual that is zero, or far smaller than any instruction tuning gives (see ``lineage``)."""
    if ratio >= lineage.MIN_RESIDUAL_RATIO or force:
        return
    measured = "all zero" if ratio == 0 else f"|R| / |B| = {ratio:.1e}"
    raise IncompatibleModelsError(
        f"the residual instruct - base is {measured} (RMS over tensors of each tensor's |R| / |B|; instruction "
        f"tuning gives 1e-2 or more, the limit is {lineage.MIN_RESIDUAL_RATIO:g}): the instruct model "
        f"({instruct}) and the base ({base}) look like the same model. Give the instruction-tuned model as the "
        "source and the model it was tuned from as --base. If you mean it, pass --force"
    )


def _check_sampled_residual(
    pairs: list[plans.PairedTensor], samples: dict[str, list[float]], force: bool
) -> None:
    """The zero-residual check for extract and port, on the lineage sample, before any arithmetic."""
    if force or not pairs:
        return
    instruct = {p.name: lineage.sample(p.instruct, within=p.base.numel) for p in pairs}
    ratio = lineage.residual_ratio(lineage.sample_norms(instruct, {p.name: samples[p.name] for p in pairs}))
    _check_residual_not_zero(ratio, force, str(pairs[0].instruct.file.parent), str(pairs[0].base.file.parent))


def _check_manifest_residual(manifest: Manifest, force: bool) -> None:
    """The zero-residual check for apply, from the manifest's exact norms (skipped if it has none)."""
    norms = [(e.residual_norm, e.base_norm) for e in manifest.tensors.values() if e.base_norm > 0]
    if norms:
        ratio = lineage.residual_ratio(norms)
        _check_residual_not_zero(ratio, force, _ref_of(manifest.instruct), _ref_of(manifest.base))


def _ref_of(identity: ModelIdentity) -> str:
    return identity.repo_id or identity.name


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


@dataclass(frozen=True)
class Push:
    """Where and how to publish a result on the Hub; ``repo_id`` None means do not publish."""

    repo_id: str | None = None
    create_pr: bool = False
    private: bool | None = None
    commit_message: str | None = None
    dry_run: bool = False
    token: str | None = None

    def card_ref(self, default: str) -> str:
        return self.repo_id or default


@dataclass(frozen=True)
class _Settings:
    """What every call shares, passed down as one value instead of a long row of arguments."""

    max_shard_size: str | int
    overwrite: bool
    progress: bool
    push: Push
    force: bool = False
    keep_fp8: bool = False  # port/apply: write the target's FP8 weights as FP8 (fp8.output_jobs)
    vocab_from: str | None = None  # port/apply: whose token wins where target and instruct clash (vocab)


@contextmanager
def _destination(output: str | Path | None, push: Push) -> Iterator[Path]:
    """The folder to write: ``output``, or a temporary one (removed after) when only publishing.

    Publishing is checked here, before any download or arithmetic: repo id shape, and a token unless dry run.
    The temporary folder is staged beside the Hugging Face cache, under ``$HF_HOME/hf-residual/staging/``,
    not in ``$TMPDIR`` (often small, or in memory): the output is as large as the model. Its free space is
    checked before anything is written (by ``staged_output``), with HF_HOME and -o named as the ways out.
    """
    if push.repo_id is not None:
        hub_publish.check_repo_id(push.repo_id)
        if not push.dry_run:
            hub_publish.check_token(push.token)
    if output is not None:
        yield Path(output)
        return
    if push.repo_id is None:
        raise ConfigError(
            "no output: give an output folder (-o DIR), a repo to publish to (--push-to), or both"
        )
    import os

    from huggingface_hub import constants

    from hf_residual import output as outputs
    from hf_residual.errors import InsufficientDiskError

    home = Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser()
    root = home / "hf-residual" / "staging"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="push-", dir=root))
    try:
        yield folder / push.repo_id.rsplit("/", 1)[-1]
    except InsufficientDiskError as error:
        if not getattr(error, "folder", Path("/")).is_relative_to(folder):
            raise
        advice = (
            f"without -o the output is staged beside the Hugging Face cache (HF_HOME={home}) before upload: "
            "free space there, point HF_HOME at a larger disk, or give -o DIR on a disk with room"
        )
        raise InsufficientDiskError(
            outputs.disk_message(error.folder, error.needed, error.available, advice)
        ) from None
    finally:
        outputs.remove_folder(folder)


def _publish(result: Result, push: Push) -> Result:
    """Upload the verified output folder when asked; record what was (or would be) uploaded."""
    if push.repo_id is not None:
        result.details["publication"] = hub_publish.publish(
            result.output,
            push.repo_id,
            create_pr=push.create_pr,
            private=push.private,
            commit_message=push.commit_message,
            token=push.token,
            dry_run=push.dry_run,
        )
    return result


def _find_base(instruct_model: ResolvedModel, ref: str | Path) -> tuple[str, str]:
    choice = hub_base.find_base(instruct_model.path, instruct_model.identity.repo_id, str(ref))
    return choice.ref, choice.source


def extract(
    instruct: str | Path,
    base: str | Path | None = None,
    output: str | Path | None = None,
    *,
    dtype: str = "bfloat16",
    codec: str | None = None,
    probe: bool | str | None = None,
    instruct_revision: str | None = None,
    base_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    push_to: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    force: bool = False,
) -> Result:
    """Write the residual ``instruct - base`` to a residual folder (weights, manifest, tokenizer, card).

    ``base`` None: found from the instruct card's ``base_model`` or the table of known pairs.
    ``push_to``: publish the verified folder to that Hub repo (one commit, or a PR with ``create_pr``);
    ``output`` may then be None (a temporary folder is used). ``dry_run`` uploads nothing.
    ``codec``: float32/bfloat16 (same as ``dtype``) or a lossy codec (``lowrank:64``, ``bitdelta``,
    ``sparse:0.1``; see docs/CODECS.md); ``probe`` (lossy codecs): measure next-token KL on the built-in
    prompts (True) or on a file of prompts, one per line. ``force``: write even a residual that is zero
    (or nearly: instruct and base look like the same model), which is otherwise refused.
    """
    push = Push(push_to, create_pr, private, commit_message, dry_run, token)
    settings = _Settings(max_shard_size, overwrite, progress, push, force)
    dtype, lossy = _choose_codec(dtype, codec)
    with _destination(output, push) as out, hub.progress_bars(progress):
        run = _extract if lossy is None else functools.partial(_extract_encoded, lossy, probe)
        result = run(instruct, base, out, dtype, instruct_revision, base_revision, settings)
        result.details["temporary_output"] = output is None
        return _publish(result, push)


def _extract(
    instruct: str | Path,
    base: str | Path | None,
    output: Path,
    dtype: str,
    instruct_revision: str | None,
    base_revision: str | None,
    settings: _Settings,
) -> Result:
    push, overwrite = settings.push, settings.overwrite
    codec = _normalise_dtype(dtype)
    check_destination(output.absolute(), overwrite=overwrite)
    instruct_model = resolve(instruct, instruct_revision, role="instruct model", token=push.token)
    base_source = "given"
    if base is None:
        base, base_source = _find_base(instruct_model, instruct)
    base_model = resolve(base, base_revision, role="base model", token=push.token)
    i_ckpt, b_ckpt = open_checkpoint(instruct_model.path), open_checkpoint(base_model.path)
    pairs = plans.pair(i_ckpt, b_ckpt)
    jobs = plans.extract_jobs(pairs, CODECS[codec])
    shards = engine.plan_shards(jobs, WEIGHTS_PREFIX, parse_size(settings.max_shard_size))
    samples = _base_samples(b_ckpt)
    _check_sampled_residual(pairs, samples, settings.force)
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        stats = _execute(shards, staging, "extract", settings.progress, checksum="sha256")
        engine.write_index(staging, WEIGHTS_PREFIX, shards)
        manifest = Manifest(
            codec=codec,
            base=_identity(base_model, b_ckpt, samples),
            instruct=_identity(instruct_model, i_ckpt),
            model_type=i_ckpt.model_type,
            architectures=list(i_ckpt.config.get("architectures") or []),
            base_vocab_size=b_ckpt.vocab_size,
            instruct_vocab_size=i_ckpt.vocab_size,
            base_tokens=vocab.token_count(base_model.path),
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
        license = _license(instruct_model.path, base_model.path)
        card = cards.residual_card(manifest, push.card_ref("RESIDUAL_FOLDER_OR_REPO"), license=license)
        (staging / "README.md").write_text(card)
    return Result(
        output,
        len(jobs),
        engine.total_bytes(shards),
        {
            "codec": codec,
            "lossless": manifest.lossless,
            "inexact_elements": manifest.inexact_elements,
            "base": str(base),
            "base_source": base_source,
            "instruct_path": instruct_model.path,  # the resolved folder: a lossy codec's probe loads it
        },
    )


def _choose_codec(dtype: str, codec: str | None) -> tuple[str, codec_registry.Codec | None]:
    """``--codec`` float32/bfloat16 is the engine's dtype; anything else is a lossy codec (parsed here)."""
    if codec is None:
        return dtype, None
    dense = codec_registry.dense_dtype(codec)
    return (dense, None) if dense is not None else (dtype, codec_registry.parse(codec))


def _extract_encoded(
    codec: codec_registry.Codec,
    probe: bool | str | None,
    instruct: str | Path,
    base: str | Path | None,
    output: Path,
    dtype: str,
    instruct_revision: str | None,
    base_revision: str | None,
    settings: _Settings,
) -> Result:
    """The exact float32 residual into a temporary folder beside the output, then encoded with ``codec``."""
    push = settings.push
    check_destination(output.absolute(), overwrite=settings.overwrite)
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.exact-", dir=parent) as tmp:
        fresh = dataclasses.replace(settings, overwrite=False)
        exact = _extract(
            instruct, base, Path(tmp) / "exact", "float32", instruct_revision, base_revision, fresh
        )
        license = _license(exact.output)
        manifest = codec_folders.encode_into(
            exact.output,
            output,
            codec,
            overwrite=settings.overwrite,
            max_shard_bytes=parse_size(settings.max_shard_size),
            render_card=lambda m: cards.residual_card(m, push.card_ref("RESIDUAL_FOLDER_OR_REPO"), license),
            probe=probe,
            instruct=exact.details["instruct_path"] if probe else None,
        )
    written = sum(p.stat().st_size for p in output.glob("residual*.safetensors"))
    details = {**exact.details, "codec": codec.spec, "lossless": False, "fidelity": manifest.fidelity}
    return Result(output, exact.tensors, written, details)


def _license(*folders: Path) -> dict:
    return hub_base.agreed_license([hub_base.read_card_data(folder) for folder in folders])


def _write_model_extras(
    staging: Path,
    target: Checkpoint,
    instruct_config: dict,
    vocab_size: int | None,
    chat_source: Path,
    card: str,
    keep_fp8: bool = False,
    layout: vocab.Layout | None = None,
) -> None:
    config = fp8.output_config(target.config, target.tensors, keep_fp8)  # FP8 -> BF16: no quantization_config
    vocab_size = layout.rows if layout is not None else vocab_size
    assets.write_json(staging / "config.json", assets.output_config(config, instruct_config, vocab_size))
    assets.copy_chat_assets(chat_source, staging)
    if layout is not None:  # the target's vocabulary grew: its tokens added, the rows recorded
        vocab.write_tokenizer(layout, staging)
        vocab.write_layout(layout, staging)
    (staging / "README.md").write_text(card + fp8.card_note(target.tensors, keep_fp8))


def apply(
    residual: str | Path,
    to: str | Path,
    output: str | Path | None = None,
    *,
    alpha: float = 1.0,
    revision: str | None = None,
    target_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    push_to: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    keep_fp8: bool = False,
    vocab_from: str | None = None,
) -> Result:
    """Write ``target + alpha * residual`` as a complete transformers model folder.

    ``push_to`` publishes the verified folder (see ``extract``); ``output`` may then be None.
    ``keep_fp8``: a target with FP8 weights (block scales) gets FP8 weights re-quantized with its block
    size (else they are written in bfloat16 and the config's quantization_config is dropped).
    ``vocab_from``: ``"target"`` or ``"instruct"``, whose token (and embedding row) wins where a target
    with a grown vocabulary and the instruct model added different tokens at one id (see ``vocab``).
    """
    push = Push(push_to, create_pr, private, commit_message, dry_run, token)
    vocab_from = vocab.check_vocab_from(vocab_from)
    settings = _Settings(max_shard_size, overwrite, progress, push, force, keep_fp8, vocab_from)
    with _destination(output, push) as out, hub.progress_bars(progress):
        result = _apply(residual, to, out, alpha, revision, target_revision, settings)
        result.details["temporary_output"] = output is None
        return _publish(result, push)


def _apply(
    residual: str | Path,
    to: str | Path | ResolvedModel,
    output: Path,
    alpha: float,
    revision: str | None,
    target_revision: str | None,
    settings: _Settings,
) -> Result:
    """``to`` may be already resolved (a compressed residual's second pass: same pinned target, one lookup)."""
    push, overwrite = settings.push, settings.overwrite
    alpha = _check_alpha(alpha)
    check_destination(output.absolute(), overwrite=overwrite)
    residual_model = resolve(residual, revision, role="residual", token=push.token)
    target_model = (
        to
        if isinstance(to, ResolvedModel)
        else resolve(to, target_revision, role="target model", token=push.token)
    )
    if codec_folders.is_compressed(residual_model.path):  # lossy codec: apply its float32 decoding
        _check_target_of_residual(read_manifest(residual_model.path), target_model, settings.force)
        with codec_folders.decoded(residual_model.path, output.absolute().parent) as dense:
            return _apply(dense, target_model, output, alpha, None, None, settings)
    manifest = read_manifest(residual_model.path)
    r_ckpt = open_checkpoint(residual_model.path, prefix=WEIGHTS_PREFIX)
    t_ckpt = open_checkpoint(target_model.path)
    t_names = names.align_target(t_ckpt, set(manifest.tensors))  # a wrapper: its prefix mapped
    t_full, t_ckpt = t_ckpt, t_names.view  # the target under the residual's names from here on
    rows = manifest.absolute_rows_from
    plans.check_same_names(
        set(r_ckpt.tensors), set(manifest.tensors), "residual weights", "residual manifest"
    )
    manifest.check_weights(r_ckpt.tensors, residual_model.path)  # shapes, dtypes; data checked as read
    base_shapes = plans.base_shapes_of_residual(r_ckpt, rows)
    vplan = vocab.prepare(base_shapes, manifest.base_vocab_size, t_ckpt)  # a target may have grown rows
    plans.check_target(t_ckpt, vplan.shapes, manifest.model_type)
    base_samples = {n: e.base_sample for n, e in manifest.tensors.items()}
    distance = _check_descendant(t_ckpt, base_samples, settings.force, base_shapes)
    _check_manifest_residual(manifest, settings.force)
    fp8.check_keep_fp8(t_full.tensors, settings.keep_fp8, t_ckpt.path)
    vplan = vocab.decide(
        vplan,
        base_rows=manifest.base_vocab_size,
        instruct_rows=manifest.instruct_vocab_size,
        target=t_ckpt,
        instruct_folder=residual_model.path,
        base_tokens=manifest.base_tokens,
        vocab_from=settings.vocab_from,
    )
    jobs = plans.apply_jobs(r_ckpt, rows, t_ckpt, alpha, manifest.checksums)
    jobs = vplan.apply_jobs(jobs, r_ckpt, t_ckpt, alpha, manifest.checksums)
    jobs = plans.with_buffers(fp8.output_jobs(jobs, t_ckpt.tensors, settings.keep_fp8), t_ckpt)
    extras = fp8.output_jobs(names.extra_jobs(t_full, t_names), t_full.tensors, settings.keep_fp8)
    jobs = names.target_jobs(jobs, extras, t_names)  # the target's names; its extra tensors copied
    shards = engine.plan_shards(jobs, "model", parse_size(settings.max_shard_size))
    instruct_config = _read_json(residual_model.path / assets.INSTRUCT_CONFIG)
    grown = manifest.instruct_vocab_size if manifest.instruct_vocab_size != manifest.base_vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        _execute(shards, staging, "apply", settings.progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=_identity(target_model, t_ckpt),
            instruct=manifest.instruct,
            base=manifest.base,
            alpha=alpha,
            codec=manifest.codec_params.get("spec", manifest.codec),  # a lossy codec's spec once decoded
            distance=distance,
            model_ref=push.card_ref("PATH_OR_REPO_OF_THIS_MODEL"),
            license=_license(residual_model.path, target_model.path),
            vocabulary=vplan.layout.describe() if vplan.layout else None,
        )
        card += names.card_note(t_names)
        _write_model_extras(
            staging,
            t_full,
            instruct_config,
            grown,
            residual_model.path,
            card,
            settings.keep_fp8,
            vplan.layout,
        )
    details = {"alpha": alpha, "distance": distance}
    if vplan.layout is not None:
        details["vocabulary"] = vplan.layout.summary()
    details.update(names.details(t_names, residual=r_ckpt, target=t_full))
    return Result(output, len(jobs), engine.total_bytes(shards), details)


def _check_target_of_residual(manifest: Manifest, target_model: ResolvedModel, force: bool) -> None:
    """Target checks from the manifest alone: run before decoding a compressed residual (slow, large)."""
    rows = manifest.absolute_rows_from
    shapes = {
        name: tuple(entry.shape) if rows.get(name) is None else (rows[name], *entry.shape[1:])
        for name, entry in manifest.tensors.items()
    }
    target = open_checkpoint(target_model.path)
    target = names.align_target(target, set(manifest.tensors)).view
    plans.check_target(
        target, vocab.prepare(shapes, manifest.base_vocab_size, target).shapes, manifest.model_type
    )
    _check_descendant(target, {n: e.base_sample for n, e in manifest.tensors.items()}, force, shapes)
    _check_manifest_residual(manifest, force)


def port(
    source: str | Path,
    to: str | Path,
    output: str | Path | None = None,
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
    push_to: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    keep_fp8: bool = False,
    vocab_from: str | None = None,
) -> Result:
    """``target + alpha * (instruct - base)`` in one pass; ``source`` may also be a residual folder or repo.

    ``base`` None: found from the instruct card's ``base_model`` or the table of known pairs.
    ``push_to`` publishes the verified folder (see ``extract``); ``output`` may then be None.
    ``keep_fp8``, ``vocab_from``: see ``apply``. Instruct and base may be FP8 too (dequantized as read).
    """
    push = Push(push_to, create_pr, private, commit_message, dry_run, token)
    vocab_from = vocab.check_vocab_from(vocab_from)
    settings = _Settings(max_shard_size, overwrite, progress, push, force, keep_fp8, vocab_from)
    with _destination(output, push) as out, hub.progress_bars(progress):
        result = _port(source, to, out, base, alpha, (revision, base_revision, target_revision), settings)
        result.details["temporary_output"] = output is None
        return _publish(result, push)


def _port(
    source: str | Path,
    to: str | Path,
    output: Path,
    base: str | Path | None,
    alpha: float,
    revisions: tuple[str | None, str | None, str | None],
    settings: _Settings,
) -> Result:
    """``revisions``: of the source, the base and the target."""
    push, overwrite = settings.push, settings.overwrite
    revision, base_revision, target_revision = revisions
    alpha = _check_alpha(alpha)
    source_model = resolve(source, revision, role="source", token=push.token)
    if is_residual_folder(source_model.path):
        return _apply(source_model.path, to, output, alpha, None, target_revision, settings)
    base_source = "given"
    if base is None:
        base, base_source = _find_base(source_model, source)
    check_destination(output.absolute(), overwrite=overwrite)
    base_model = resolve(base, base_revision, role="base model", token=push.token)
    target_model = resolve(to, target_revision, role="target model", token=push.token)
    i_ckpt, b_ckpt, t_ckpt = (open_checkpoint(m.path) for m in (source_model, base_model, target_model))
    pairs = plans.pair(i_ckpt, b_ckpt)
    t_names = names.align_target(t_ckpt, {p.name for p in pairs})  # a wrapper: its prefix mapped
    t_full, t_ckpt = t_ckpt, t_names.view  # the target under the base's names from here on
    vplan = vocab.prepare({p.name: p.base.shape for p in pairs}, b_ckpt.vocab_size, t_ckpt)
    plans.check_target(t_ckpt, vplan.shapes, b_ckpt.model_type)  # weights only; grown vocabulary allowed
    samples = _base_samples(b_ckpt)
    distance = _check_descendant(t_ckpt, samples, settings.force, {p.name: p.base.shape for p in pairs})
    _check_sampled_residual(pairs, samples, settings.force)
    fp8.check_keep_fp8(t_full.tensors, settings.keep_fp8, t_ckpt.path)
    vplan = vocab.decide(
        vplan,
        base_rows=b_ckpt.vocab_size,
        instruct_rows=i_ckpt.vocab_size,
        target=t_ckpt,
        instruct_folder=source_model.path,
        base_tokens=vocab.token_count(base_model.path),
        vocab_from=settings.vocab_from,
    )
    jobs = vplan.port_jobs(plans.port_jobs(pairs, t_ckpt, alpha), pairs, t_ckpt, alpha)
    jobs = fp8.output_jobs(jobs, t_ckpt.tensors, settings.keep_fp8)
    jobs = plans.with_buffers(jobs, t_ckpt)
    extras = fp8.output_jobs(names.extra_jobs(t_full, t_names), t_full.tensors, settings.keep_fp8)
    jobs = names.target_jobs(jobs, extras, t_names)  # the target's names; its extra tensors copied
    shards = engine.plan_shards(jobs, "model", parse_size(settings.max_shard_size))
    grown = i_ckpt.vocab_size if i_ckpt.vocab_size != b_ckpt.vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        _execute(shards, staging, "port", settings.progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=_identity(target_model, t_ckpt),
            instruct=_identity(source_model, i_ckpt),
            base=_identity(base_model, b_ckpt, samples),
            alpha=alpha,
            codec="none (computed in one pass)",
            distance=distance,
            model_ref=push.card_ref("PATH_OR_REPO_OF_THIS_MODEL"),
            license=_license(target_model.path, source_model.path, base_model.path),
            vocabulary=vplan.layout.describe() if vplan.layout else None,
        )
        card += names.card_note(t_names)
        _write_model_extras(
            staging, t_full, i_ckpt.config, grown, source_model.path, card, settings.keep_fp8, vplan.layout
        )
    details = {"alpha": alpha, "distance": distance, "base": str(base), "base_source": base_source}
    if vplan.layout is not None:
        details["vocabulary"] = vplan.layout.summary()
    details.update(names.details(t_names, instruct=i_ckpt, base=b_ckpt, target=t_full))
    return Result(output, len(jobs), engine.total_bytes(shards), details)


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
