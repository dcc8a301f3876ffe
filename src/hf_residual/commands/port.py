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
    add_merge_options(parser)
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
        **{**model_kwargs(args), **merge_kwargs(args)},  # --alpha: the flag, else the recipe's
    )
    if args.json:
        from hf_residual.commands._json import emit, written

        emit(written("port", result, time.perf_counter() - started))
        return 0
    print_base(result.details)
    print_model(result)
    return 0


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    """``--alpha-for``, ``--method`` and ``--recipe`` (port and apply); ``--alpha`` is added before."""
    from hf_residual.core.methods import METHOD_HELP

    parser.add_argument(
        "--alpha-for",
        action="append",
        default=[],
        metavar="PATTERN=VALUE",
        help="alpha for the tensors whose name matches the Python regex PATTERN (re.search); repeatable, the "
        "first matching pattern wins, --alpha applies to the rest. E.g. --alpha-for 'embed_tokens|lm_head=0.5' "
        "--alpha-for 'layers\\.(2[4-9]|3[01])\\.=1.2'. A pattern that matches no tensor is an error",
    )
    parser.add_argument("--method", metavar="SPEC", help=METHOD_HELP)
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help="a recipe YAML (written by hf-residual tune, or by hand) setting alpha, alpha_for and method; "
        "--alpha and --method given as well override it, --alpha-for patterns go before its own",
    )
    parser.set_defaults(alpha=None)  # so that a recipe's alpha applies unless --alpha is given


def merge_kwargs(args: argparse.Namespace) -> dict:
    """``alpha``, ``alpha_for`` and ``method`` from the flags and the recipe (flags win)."""
    from hf_residual.core.methods import TASK_ARITHMETIC, parse_alpha_for
    from hf_residual.ops.recipe import Recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    alpha_for = parse_alpha_for(args.alpha_for)
    alpha_for.update({k: v for k, v in recipe.alpha_for.items() if k not in alpha_for})
    return {
        "alpha": recipe.alpha if args.alpha is None else args.alpha,
        "alpha_for": alpha_for,
        "method": args.method or recipe.method or TASK_ARITHMETIC,
    }
