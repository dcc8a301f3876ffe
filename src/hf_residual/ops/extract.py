"""``extract``: the residual ``instruct - base`` as a residual folder (weights, manifest, tokenizer, card).

The exact path streams ``instruct - base`` through the engine in float32 or bfloat16; a lossy codec
(``codec="lowrank:64"``...) computes the exact float32 residual one tensor at a time from the model files
(``codecs.exact``) and encodes it (``codecs.folders``): no temporary float32 folder.
"""

from __future__ import annotations

from pathlib import Path

from hf_residual.codecs import exact as codec_exact
from hf_residual.codecs import folders as codec_folders
from hf_residual.codecs import registry as codec_registry
from hf_residual.core import assets, engine, plans, vocab
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.manifest import CODEC_NOTES, CODECS, WEIGHTS_PREFIX, Manifest, TensorEntry
from hf_residual.core.output import check_destination, staged_output
from hf_residual.hub import cards
from hf_residual.hub.sources import resolve
from hf_residual.ops import checks, common
from hf_residual.ops.common import Result
from hf_residual.ops.options import Options, Publish, normalise_dtype


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
    publish = Publish(push_to, create_pr, private, commit_message, dry_run, token)
    options = Options(max_shard_size, overwrite, progress, publish, force)
    dtype, lossy = _choose_codec(dtype, codec)
    revisions = (instruct_revision, base_revision)
    if lossy is None:
        return common.run(
            output, options, lambda out: _extract(instruct, base, out, dtype, revisions, options)
        )
    return common.run(
        output, options, lambda out: _extract_encoded(lossy, probe, instruct, base, out, revisions, options)
    )


def _extract(
    instruct: str | Path,
    base: str | Path | None,
    output: Path,
    dtype: str,
    revisions: tuple[str | None, str | None],
    options: Options,
) -> Result:
    """``revisions``: of the instruct model and of the base."""
    publish, overwrite = options.publish, options.overwrite
    codec = normalise_dtype(dtype)
    check_destination(output.absolute(), overwrite=overwrite)
    (instruct_model, i_ckpt), (base_model, b_ckpt), base, base_source = _open_pair(
        instruct, base, revisions, publish.token
    )
    pairs = plans.pair(i_ckpt, b_ckpt)
    jobs = plans.extract_jobs(pairs, CODECS[codec])
    shards = engine.plan_shards(jobs, WEIGHTS_PREFIX, options.max_shard_bytes)
    samples = checks.base_samples(b_ckpt)
    checks.check_sampled_residual(pairs, samples, options.force)
    with staged_output(output, overwrite=overwrite, required_bytes=engine.total_bytes(shards)) as staging:
        stats = common.execute(shards, staging, "extract", options.progress, checksum="sha256")
        engine.write_index(staging, WEIGHTS_PREFIX, shards)
        manifest = _manifest(
            codec, CODECS[codec], pairs, (instruct_model, i_ckpt), (base_model, b_ckpt), samples
        )
        for p in pairs:
            entry, stat = manifest.tensors[p.name], stats[p.name]
            entry.sha256, entry.base_norm, entry.residual_norm = (
                stat.sha256,
                stat.minus_norm,
                stat.result_norm,
            )
        manifest.note = CODEC_NOTES[codec]
        manifest.inexact_elements = sum(s.inexact for s in stats.values())
        manifest.write(staging)
        assets.copy_chat_assets(instruct_model.path, staging)
        if i_ckpt.config:
            assets.write_json(staging / assets.INSTRUCT_CONFIG, i_ckpt.config)
        license = common.license_of(instruct_model.path, base_model.path)
        card = cards.residual_card(manifest, publish.card_ref("RESIDUAL_FOLDER_OR_REPO"), license=license)
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
    revisions: tuple[str | None, str | None],
    options: Options,
) -> Result:
    """The exact float32 residual, one tensor at a time from the model files, encoded with ``codec``."""
    publish = options.publish
    check_destination(output.absolute(), overwrite=options.overwrite)
    (instruct_model, i_ckpt), (base_model, b_ckpt), base, base_source = _open_pair(
        instruct, base, revisions, publish.token
    )
    pairs = plans.pair(i_ckpt, b_ckpt)
    jobs = plans.extract_jobs(pairs, "F32")
    samples = checks.base_samples(b_ckpt)
    checks.check_sampled_residual(pairs, samples, options.force)
    # sha256 and norms are set when each tensor is encoded (encode_tensors)
    manifest = _manifest("float32", "F32", pairs, (instruct_model, i_ckpt), (base_model, b_ckpt), samples)

    def exact():  # a fresh pass over I - B; its norms go into the manifest as each tensor is encoded
        return codec_exact.exact_tensors(jobs)

    def finish(staging: Path) -> None:
        assets.copy_chat_assets(instruct_model.path, staging)
        if i_ckpt.config:
            assets.write_json(staging / assets.INSTRUCT_CONFIG, i_ckpt.config)

    license = common.license_of(instruct_model.path, base_model.path)
    encoded = codec_folders.encode_into(
        exact,
        manifest,
        output,
        codec,
        overwrite=options.overwrite,
        max_shard_bytes=options.max_shard_bytes,
        finish=finish,
        render_card=lambda m: cards.residual_card(m, publish.card_ref("RESIDUAL_FOLDER_OR_REPO"), license),
        probe=probe,
        instruct=instruct_model.path if probe else None,
    )
    written = sum(p.stat().st_size for p in output.glob("residual*.safetensors"))
    details = {
        "codec": codec.spec,
        "lossless": False,
        "inexact_elements": 0,
        "base": str(base),
        "base_source": base_source,
        "instruct_path": instruct_model.path,
        "fidelity": encoded.fidelity,
    }
    return Result(output, len(jobs), written, details)


def _manifest(codec: str, dtype: str, pairs, instruct: tuple, base: tuple, samples: dict) -> Manifest:
    """The residual's manifest before its weights are written: identities, vocabularies, one entry per
    tensor (checksums and norms are filled in by the caller as the tensors are computed)."""
    (instruct_model, i_ckpt), (base_model, b_ckpt) = instruct, base
    return Manifest(
        codec=codec,
        base=common.identity_of(base_model, b_ckpt, samples),
        instruct=common.identity_of(instruct_model, i_ckpt),
        model_type=i_ckpt.model_type,
        architectures=list(i_ckpt.config.get("architectures") or []),
        base_vocab_size=b_ckpt.vocab_size,
        instruct_vocab_size=i_ckpt.vocab_size,
        base_tokens=vocab.token_count(base_model.path),
        tensors={
            p.name: TensorEntry(
                shape=list(p.instruct.shape),
                dtype=dtype,
                sha256="",
                source_dtype=p.instruct.dtype,
                absolute_rows_from=p.absolute_rows_from,
                base_sample=samples[p.name],
            )
            for p in pairs
        },
    )


def _open_pair(instruct, base, revisions: tuple[str | None, str | None], token: str | None) -> tuple:
    """Resolve and open the instruct model and its base (found from the instruct model's card when not
    given): ``(instruct_model, ckpt), (base_model, ckpt), base, base_source`` ("given" or how it was found)."""
    instruct_model = resolve(instruct, revisions[0], role="instruct model", token=token)
    base_source = "given"
    if base is None:
        base, base_source = common.find_base(instruct_model, instruct)
    base_model = resolve(base, revisions[1], role="base model", token=token)
    return (
        (instruct_model, open_checkpoint(instruct_model.path)),
        (base_model, open_checkpoint(base_model.path)),
        base,
        base_source,
    )
