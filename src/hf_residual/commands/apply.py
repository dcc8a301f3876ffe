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
    add_target_options,
    model_kwargs,
    print_model,
)
from hf_residual.commands._json import add_json
from hf_residual.commands.port import add_merge_options, merge_kwargs


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
    add_merge_options(parser)
    parser.add_argument(
        "--base",
        metavar="BASE",
        help="the model the residual was extracted from; read only by --method ties and orthogonal (they "
        f"use the CPT update D = TARGET - BASE): {MODEL_HELP}",
    )
    add_revision(parser, "--base-revision", "the base", "BASE")
    add_force(parser)
    add_target_options(parser)
    add_quiet(parser)
    add_publish(parser, "ported model")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from hf_residual.ops.apply import apply

    started = time.perf_counter()
    # a checkpoint saved sharded (FSDP SHARDED_STATE_DICT, DeepSpeed ZeRO) is consolidated by apply()
    result = apply(
        args.residual,
        args.to,
        args.output,
        revision=args.revision,
        base=args.base,
        base_revision=args.base_revision,
        **{**model_kwargs(args), **merge_kwargs(args)},  # --alpha: the flag, else the recipe's
    )
    if args.json:
        from hf_residual.commands._json import emit, written

        emit(written("apply", result, time.perf_counter() - started))
        return 0
    print_model(result)
    return 0
