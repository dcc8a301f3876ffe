"""``apply``: ``target + alpha * residual`` as a complete transformers model folder.

A compressed residual (lossy codec) is read in the stream: each encoded tensor is decoded a block at a
time by its codec's reader (``codecs.stream``), with no decoded copy on disk. A target saved
sharded across processes (FSDP ``SHARDED_STATE_DICT``, DeepSpeed ZeRO) is consolidated first
(``core.sharded``).
"""

from __future__ import annotations

from pathlib import Path

from hf_residual.codecs import stream as codec_stream
from hf_residual.core import assets, engine, fp8, names, plans, vocab
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.output import check_destination, staged_output
from hf_residual.core.sharded import consolidate
from hf_residual.errors import ConfigError, IncompatibleModelsError
from hf_residual.hub import ResolvedModel, cards
from hf_residual.hub.sources import resolve
from hf_residual.ops import checks, common
from hf_residual.ops.common import Result
from hf_residual.ops.options import Merge, Options, Publish, check_alpha


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
    alpha_for: dict[str, float] | None = None,
    method: str = "task_arithmetic",
    base: str | Path | None = None,
    base_revision: str | None = None,
) -> Result:
    """Write ``target + alpha * residual`` as a complete transformers model folder.

    ``push_to`` publishes the verified folder (see ``extract``); ``output`` may then be None.
    ``keep_fp8``: a target with FP8 weights (block scales) gets FP8 weights re-quantized with its block
    size (else they are written in bfloat16 and the config's quantization_config is dropped).
    ``vocab_from``: ``"target"`` or ``"instruct"``, whose token (and embedding row) wins where a target
    with a grown vocabulary and the instruct model added different tokens at one id (see ``vocab``).
    ``to`` may be a checkpoint folder saved sharded (FSDP, ZeRO): it is consolidated first.
    ``alpha_for``, ``method``: see ``port``. ``base``: the residual's base model, read only by a method
    that needs it (``ties`` elects signs against ``D = target - base``); ``dare`` works without it.
    """
    publish = Publish(push_to, create_pr, private, commit_message, dry_run, token)
    merge = Merge(alpha_for or {}, method, base, base_revision)
    options = Options(max_shard_size, overwrite, progress, publish, force, keep_fp8, vocab_from, merge)

    def work(out: Path) -> Result:
        with consolidate(to, workdir=sharded_workdir(output)) as target:
            return apply_residual(residual, target, out, alpha, (revision, target_revision), options)

    return common.run(output, options, work)


def sharded_workdir(output: str | Path | None) -> Path | None:
    """Where a sharded target is consolidated: beside the output, else beside the checkpoint."""
    return Path(output).absolute().parent if output is not None else None


def apply_residual(
    residual: str | Path,
    to: str | Path,
    output: Path,
    alpha: float,
    revisions: tuple[str | None, str | None],
    options: Options,
) -> Result:
    """Resolve residual and target (``revisions``: of each), decode a compressed residual, then apply."""
    publish = options.publish
    alpha = check_alpha(alpha)
    check_destination(output.absolute(), overwrite=options.overwrite)
    residual_model = resolve(residual, revisions[0], role="residual", token=publish.token)
    target_model = resolve(to, revisions[1], role="target model", token=publish.token)
    return _apply_dense(residual_model.path, target_model, output, alpha, options)


def _apply_dense(
    residual: Path, target_model: ResolvedModel, output: Path, alpha: float, options: Options
) -> Result:
    """``target + alpha * residual`` for a residual folder: dense, or compressed (decoded in the stream)."""
    publish, overwrite = options.publish, options.overwrite
    manifest, r_ckpt = codec_stream.open_residual(residual)  # compressed: tensors with block decoders
    checksums = codec_stream.checksums(manifest, r_ckpt)
    t_ckpt = open_checkpoint(target_model.path)
    t_names = names.align_target(t_ckpt, set(manifest.tensors))  # a wrapper: its prefix mapped
    t_full, t_ckpt = t_ckpt, t_names.view  # the target under the residual's names from here on
    rows = manifest.absolute_rows_from
    plans.check_same_names(
        set(r_ckpt.tensors), set(manifest.tensors), "residual weights", "residual manifest"
    )
    manifest.check_weights(r_ckpt.tensors, residual)  # shapes, dtypes; data checked as read
    base_shapes = plans.base_shapes_of_residual(r_ckpt, rows)
    vplan = vocab.prepare(base_shapes, manifest.base_vocab_size, t_ckpt)  # a target may have grown rows
    plans.check_target(t_ckpt, vplan.shapes, manifest.model_type)
    base_samples = {n: e.base_sample for n, e in manifest.tensors.items()}
    distance = checks.check_descendant(t_ckpt, base_samples, options.force, base_shapes)
    checks.check_manifest_residual(manifest, options.force)
    fp8.check_keep_fp8(t_full.tensors, options.keep_fp8, t_ckpt.path)
    vplan = vocab.decide(
        vplan,
        base_rows=manifest.base_vocab_size,
        instruct_rows=manifest.instruct_vocab_size,
        target=t_ckpt,
        instruct_folder=residual,
        base_tokens=manifest.base_tokens,
        vocab_from=options.vocab_from,
    )
    jobs = plans.apply_jobs(r_ckpt, rows, t_ckpt, alpha, checksums)
    jobs = vplan.apply_jobs(jobs, r_ckpt, t_ckpt, alpha, checksums)
    base_ckpt = _method_base(options, base_shapes)
    jobs, merged = options.merge.plan(jobs, list(r_ckpt.tensors), alpha, base_ckpt)
    jobs = common.output_jobs(jobs, t_full, t_names, options.keep_fp8)
    shards = engine.plan_shards(jobs, "model", options.max_shard_bytes)
    instruct_config = common.read_json(residual / assets.INSTRUCT_CONFIG)
    grown = manifest.instruct_vocab_size if manifest.instruct_vocab_size != manifest.base_vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        common.execute(shards, staging, "apply", options.progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=common.identity_of(target_model, t_ckpt),
            instruct=manifest.instruct,
            base=manifest.base,
            alpha=alpha,
            codec=manifest.codec_params.get("spec", manifest.codec),  # a lossy codec's spec
            distance=distance,
            model_ref=publish.card_ref("PATH_OR_REPO_OF_THIS_MODEL"),
            license=common.license_of(residual, target_model.path),
            vocabulary=vplan.layout.describe() if vplan.layout else None,
            merge=merged,
        )
        card += names.card_note(t_names)
        common.write_model_extras(
            staging, t_full, instruct_config, grown, residual, card, options.keep_fp8, vplan.layout
        )
    details = {"alpha": alpha, "distance": distance, **merged}
    if vplan.layout is not None:
        details["vocabulary"] = vplan.layout.summary()
    details.update(names.details(t_names, residual=r_ckpt, target=t_full))
    # instruct and base as the residual's manifest records them; the target as resolved here
    details["models"] = common.models_detail(
        instruct=manifest.instruct, base=manifest.base, target=target_model
    )
    return Result(output, len(jobs), engine.total_bytes(shards), details)


def _method_base(options: Options, base_shapes: dict[str, tuple]):
    """The base checkpoint for a method that reads it (ties), checked to have the residual's shapes."""
    merge = options.merge
    if not merge.parsed.needs_base:
        return None
    if merge.base is None:
        raise ConfigError(
            f"method {merge.parsed.spec!r} reads the CPT update D = target - base, and a residual holds no "
            "base: pass the model the residual was extracted from as base= (--base BASE)"
        )
    model = resolve(merge.base, merge.base_revision, role="base model", token=options.publish.token)
    base = open_checkpoint(model.path)
    for name, shape in base_shapes.items():
        info = base.tensors.get(name)
        if info is None or tuple(info.shape) != tuple(shape):
            got = "missing" if info is None else f"of shape {list(info.shape)}"
            raise IncompatibleModelsError(
                f"base tensor {name!r} is {got} where the residual's base has shape {list(shape)}: "
                f"is {merge.base} the model the residual was extracted from?"
            )
    return base
