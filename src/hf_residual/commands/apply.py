"""``hf-residual apply``: add a residual folder to a target model."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import (
    MODEL_HELP,
    add_alpha,
    add_force,
    add_output,
    add_publish,
    add_quiet,
    add_revision,
    human_bytes,
    output_label,
    print_publication,
    publish_kwargs,
)
from hf_residual.commands._json import add_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "apply",
        help="add a residual folder to a target model: TARGET + alpha * R",
        description=(
            "Write TARGET + ALPHA * R as a complete transformers model folder: weights in the target's dtype, "
            "the target's config, and the instruct side's tokenizer, chat template and generation config."
        ),
    )
    parser.add_argument(
        "residual",
        metavar="RESIDUAL",
        help="a residual written by hf-residual extract: a local folder or a Hub repo id (org/name[@rev])",
    )
    add_revision(parser, "--revision", "the residual", "RESIDUAL")
    parser.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help=f"the continually pre-trained (or derived) model to add the residual to: {MODEL_HELP}",
    )
    add_revision(parser, "--target-revision", "the target", "TARGET")
    add_output(parser, "ported model")
    add_alpha(parser)
    add_force(parser)
    parser.add_argument(
        "--keep-fp8",
        action="store_true",
        help="a TARGET stored in FP8 with block scales (quant_method fp8): write FP8 weights re-quantized "
        "with its block size, so the output loads like TARGET did. Default: those weights are written in "
        "bfloat16 and config.json loses its quantization_config",
    )
    parser.add_argument(
        "--vocab-from",
        choices=("target", "instruct"),
        default=None,
        help="a TARGET whose vocabulary grew and an instruct model that added other tokens at the same ids "
        "(or the same token at other ids): whose token and embedding row win at each clash; the other "
        "side's clashing tokens are left out. Default: refuse, naming the clashes",
    )
    add_quiet(parser)
    add_publish(parser, "ported model")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from hf_residual import api
    from hf_residual.cpt.sharded import consolidate

    started = time.perf_counter()
    # a checkpoint saved sharded (FSDP SHARDED_STATE_DICT, DeepSpeed ZeRO) is consolidated first
    with consolidate(args.to, workdir=Path(args.output).parent if args.output else None) as target:
        result = api.apply(
            args.residual,
            target,
            args.output,
            alpha=args.alpha,
            revision=args.revision,
            target_revision=args.target_revision,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            force=args.force,
            keep_fp8=args.keep_fp8,
            vocab_from=args.vocab_from,
            progress=not args.quiet,
            **publish_kwargs(args),
        )
    if args.json:
        from hf_residual.commands._json import emit, written

        emit(written("apply", result, time.perf_counter() - started))
        return 0
    print(
        f"wrote model {output_label(result)}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"alpha {result.details['alpha']}, |target - base| / |base| = {result.details['distance']:.4f}"
    )
    from hf_residual.vocab import summary_line

    if summary_line(result.details):
        print(summary_line(result.details))
    print_publication(result.details)
    return 0
