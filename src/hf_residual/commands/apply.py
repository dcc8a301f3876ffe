"""``hf-residual apply``: add a residual folder to a target model."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import MODEL_HELP, add_alpha, add_force, add_output, add_quiet, human_bytes


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
        "residual", metavar="RESIDUAL", help="a residual folder written by hf-residual extract"
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help=f"the continually pre-trained (or derived) model to add the residual to: {MODEL_HELP}",
    )
    add_output(parser, "ported model")
    add_alpha(parser)
    add_force(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual import api

    result = api.apply(
        args.residual,
        args.to,
        args.output,
        alpha=args.alpha,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        force=args.force,
        progress=not args.quiet,
    )
    print(
        f"wrote model {result.output}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"alpha {result.details['alpha']}"
    )
    return 0
