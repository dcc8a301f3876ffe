"""``hf-residual port``: target + alpha * (instruct - base) in one pass."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import MODEL_HELP, add_alpha, add_force, add_output, add_quiet, human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "port",
        help="port instruction following to a target: TARGET + alpha * (SOURCE - BASE), in one pass",
        description=(
            "Port the instruction residual of SOURCE onto TARGET without writing the residual. SOURCE is an "
            "instruction-tuned model (then --base names the model it was tuned from) or a residual folder "
            "written by `hf-residual extract`. TARGET is a continually pre-trained version of the base, or "
            "another model derived from it. The output is a complete transformers model folder."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help=f"instruct model or residual folder: {MODEL_HELP}")
    parser.add_argument("--to", required=True, metavar="TARGET", help=f"the model to port to: {MODEL_HELP}")
    parser.add_argument(
        "--base",
        metavar="BASE",
        help="the base SOURCE was fine-tuned from (needed when SOURCE is an instruct model)",
    )
    add_output(parser, "ported model")
    add_alpha(parser)
    add_force(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual import api

    result = api.port(
        args.source,
        args.to,
        args.output,
        base=args.base,
        alpha=args.alpha,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        force=args.force,
        progress=not args.quiet,
    )
    print(
        f"wrote model {result.output}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"alpha {result.details['alpha']}, |target - base| / |base| = {result.details['distance']:.4f}"
    )
    return 0
