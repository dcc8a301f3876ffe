"""``hf-residual port``: target + alpha * (instruct - base) in one pass."""

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
    print_base,
    print_model,
)
from hf_residual.commands._json import add_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "port",
        help="port instruction following to a target: TARGET + alpha * (SOURCE - BASE), in one pass",
        description=(
            "Port the instruction residual of SOURCE onto TARGET without writing the residual: "
            "OUTPUT = TARGET + ALPHA * (SOURCE - BASE). SOURCE is an instruction-tuned model, or a residual folder or repo "
            "written by `hf-residual extract`. TARGET (--to) is a continually pre-trained version of the "
            "base, or another model derived from it. BASE (--base) is the model SOURCE was fine-tuned from; "
            "when omitted it is found from SOURCE's model card (base_model) or hf-residual's table of known "
            "pairs. Every model may be a local folder or a Hub repo id (org/name, or org/name@revision); Hub "
            "revisions are pinned to commit shas, recorded in the card. The output is a complete "
            "transformers model folder (-o) and/or a Hub repo (--push-to). Example: hf-residual port "
            "meta-llama/Llama-3.1-8B-Instruct --to my-org/my-cpt-model --push-to my-org/my-cpt-model-instruct"
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help=f"instruct model or residual: {MODEL_HELP}")
    parser.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help=f"the model to port to (a continually pre-trained or derived version of BASE): {MODEL_HELP}",
    )
    parser.add_argument(
        "--base",
        metavar="BASE",
        help="the model SOURCE was fine-tuned from, when SOURCE is an instruct model. Optional: found from "
        "SOURCE's card (base_model) or hf-residual's table of known pairs; when given, it always wins",
    )
    add_revision(parser, "--revision", "the source", "SOURCE")
    add_revision(parser, "--base-revision", "the base", "BASE")
    add_revision(parser, "--target-revision", "the target", "TARGET")
    add_output(parser, "ported model")
    add_alpha(parser)
    add_force(parser)
    add_target_options(parser)
    add_quiet(parser)
    add_publish(parser, "ported model")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from hf_residual.ops.port import port

    started = time.perf_counter()
    # a checkpoint saved sharded (FSDP SHARDED_STATE_DICT, DeepSpeed ZeRO) is consolidated by port()
    result = port(
        args.source,
        args.to,
        args.output,
        base=args.base,
        revision=args.revision,
        base_revision=args.base_revision,
        **model_kwargs(args),
    )
    if args.json:
        from hf_residual.commands._json import emit, written

        emit(written("port", result, time.perf_counter() - started))
        return 0
    print_base(result.details)
    print_model(result)
    return 0
