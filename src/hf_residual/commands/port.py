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
    human_bytes,
    output_label,
    print_base,
    print_publication,
    publish_kwargs,
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
        result = api.port(
            args.source,
            target,
            args.output,
            base=args.base,
            alpha=args.alpha,
            revision=args.revision,
            base_revision=args.base_revision,
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

        emit(written("port", result, time.perf_counter() - started))
        return 0
    print_base(result.details)
    print(
        f"wrote model {output_label(result)}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"alpha {result.details['alpha']}, |target - base| / |base| = {result.details['distance']:.4f}"
    )
    from hf_residual.vocab import summary_line

    if summary_line(result.details):
        print(summary_line(result.details))
    print_publication(result.details)
    return 0
