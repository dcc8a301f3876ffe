"""``port``: ``target + alpha * (instruct - base)`` in one pass, no residual folder in between.

A source that is a residual folder or repo is applied instead (``apply.apply_residual``); a target
saved sharded (FSDP, ZeRO) is consolidated first (``core.sharded``).
"""

from __future__ import annotations

from pathlib import Path

from hf_residual.core import engine, fp8, names, plans, vocab
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.manifest import is_residual_folder
from hf_residual.core.output import check_destination, staged_output
from hf_residual.core.sharded import consolidate
from hf_residual.hub import cards
from hf_residual.hub.sources import resolve
from hf_residual.ops import checks, common
from hf_residual.ops.apply import apply_residual, sharded_workdir
from hf_residual.ops.common import Result
from hf_residual.ops.options import Merge, Options, Publish, check_alpha


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
    alpha_for: dict[str, float] | None = None,
    method: str = "task_arithmetic",
) -> Result:
    """``target + alpha * (instruct - base)`` in one pass; ``source`` may also be a residual folder or repo.

    ``base`` None: found from the instruct card's ``base_model`` or the table of known pairs.
    ``push_to`` publishes the verified folder (see ``extract``); ``output`` may then be None.
    ``keep_fp8``, ``vocab_from``: see ``apply``. Instruct and base may be FP8 too (dequantized as read).
    ``to`` may be a checkpoint folder saved sharded (FSDP, ZeRO): it is consolidated first.
    ``alpha_for``: regex on tensor names -> alpha (``re.search``, first match wins, in order; ``alpha``
    for the rest); ``method``: ``task_arithmetic``, ``ties:density=D`` or ``dare:p=P,seed=S`` (see
    ``core.methods``). Both are recorded in the details and the card.
    """
    publish = Publish(push_to, create_pr, private, commit_message, dry_run, token)
    merge = Merge(alpha_for or {}, method, base, base_revision)
    options = Options(max_shard_size, overwrite, progress, publish, force, keep_fp8, vocab_from, merge)
    revisions = (revision, base_revision, target_revision)

    def work(out: Path) -> Result:
        with consolidate(to, workdir=sharded_workdir(output)) as target:
            return _port(source, target, out, base, alpha, revisions, options)

    return common.run(output, options, work)


def _port(
    source: str | Path,
    to: str | Path,
    output: Path,
    base: str | Path | None,
    alpha: float,
    revisions: tuple[str | None, str | None, str | None],
    options: Options,
) -> Result:
    """``revisions``: of the source, the base and the target."""
    publish, overwrite = options.publish, options.overwrite
    revision, base_revision, target_revision = revisions
    alpha = check_alpha(alpha)
    source_model = resolve(source, revision, role="source", token=publish.token)
    if is_residual_folder(source_model.path):
        return apply_residual(source_model.path, to, output, alpha, (None, target_revision), options)
    base_source = "given"
    if base is None:
        base, base_source = common.find_base(source_model, source)
    check_destination(output.absolute(), overwrite=overwrite)
    base_model = resolve(base, base_revision, role="base model", token=publish.token)
    target_model = resolve(to, target_revision, role="target model", token=publish.token)
    i_ckpt, b_ckpt, t_ckpt = (open_checkpoint(m.path) for m in (source_model, base_model, target_model))
    pairs = plans.pair(i_ckpt, b_ckpt)
    t_names = names.align_target(t_ckpt, {p.name for p in pairs})  # a wrapper: its prefix mapped
    t_full, t_ckpt = t_ckpt, t_names.view  # the target under the base's names from here on
    vplan = vocab.prepare({p.name: p.base.shape for p in pairs}, b_ckpt.vocab_size, t_ckpt)
    plans.check_target(t_ckpt, vplan.shapes, b_ckpt.model_type)  # weights only; grown vocabulary allowed
    samples = checks.base_samples(b_ckpt)
    distance = checks.check_descendant(t_ckpt, samples, options.force, {p.name: p.base.shape for p in pairs})
    checks.check_sampled_residual(pairs, samples, options.force)
    fp8.check_keep_fp8(t_full.tensors, options.keep_fp8, t_ckpt.path)
    vplan = vocab.decide(
        vplan,
        base_rows=b_ckpt.vocab_size,
        instruct_rows=i_ckpt.vocab_size,
        target=t_ckpt,
        instruct_folder=source_model.path,
        base_tokens=vocab.token_count(base_model.path),
        vocab_from=options.vocab_from,
    )
    jobs = vplan.port_jobs(plans.port_jobs(pairs, t_ckpt, alpha), pairs, t_ckpt, alpha)
    jobs, merged = options.merge.plan(jobs, [p.name for p in pairs], alpha)
    jobs = common.output_jobs(jobs, t_full, t_names, options.keep_fp8)
    shards = engine.plan_shards(jobs, "model", options.max_shard_bytes)
    grown = i_ckpt.vocab_size if i_ckpt.vocab_size != b_ckpt.vocab_size else None
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        common.execute(shards, staging, "port", options.progress)
        engine.write_index(staging, "model", shards)
        card = cards.ported_card(
            target=common.identity_of(target_model, t_ckpt),
            instruct=common.identity_of(source_model, i_ckpt),
            base=common.identity_of(base_model, b_ckpt, samples),
            alpha=alpha,
            codec="none (computed in one pass)",
            distance=distance,
            model_ref=publish.card_ref("PATH_OR_REPO_OF_THIS_MODEL"),
            license=common.license_of(target_model.path, source_model.path, base_model.path),
            vocabulary=vplan.layout.describe() if vplan.layout else None,
            merge=merged,
        )
        card += names.card_note(t_names)
        common.write_model_extras(
            staging, t_full, i_ckpt.config, grown, source_model.path, card, options.keep_fp8, vplan.layout
        )
    details = {"alpha": alpha, "distance": distance, "base": str(base), "base_source": base_source, **merged}
    if vplan.layout is not None:
        details["vocabulary"] = vplan.layout.summary()
    details.update(names.details(t_names, instruct=i_ckpt, base=b_ckpt, target=t_full))
    details["models"] = common.models_detail(instruct=source_model, base=base_model, target=target_model)
    return Result(output, len(jobs), engine.total_bytes(shards), details)
