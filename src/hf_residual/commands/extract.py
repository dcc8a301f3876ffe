"""``hf-residual extract``: write the residual instruct - base to a residual folder."""

from __future__ import annotations

import argparse

from hf_residual.codecs.cli import add_codec, codec_kwargs, print_fidelity
from hf_residual.commands._common import (
    MODEL_HELP,
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
        "extract",
        help="compute R = instruct - base once and save it as a residual folder",
        description=(
            "Compute the instruction residual R = INSTRUCT - BASE, tensor by tensor (float32 math), and write "
            "a residual folder: sharded safetensors with an index, a manifest (residual.json) with checksums, "
            "the instruct model's tokenizer, chat template and generation config, and a model card. "
            "With --push-to it is published as a residual repo that `hf-residual apply` and `port` take."
        ),
    )
    parser.add_argument("instruct", metavar="INSTRUCT", help=f"the instruction-tuned model: {MODEL_HELP}")
    parser.add_argument(
        "--base",
        metavar="BASE",
        help=f"the model INSTRUCT was tuned from: {MODEL_HELP}. Optional: found from INSTRUCT's card "
        "(base_model) or hf-residual's table of known pairs; when given, it always wins",
    )
    add_revision(parser, "--revision", "the instruct model", "INSTRUCT")
    add_revision(parser, "--base-revision", "the base", "BASE")
    add_output(parser, "residual folder")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="residual storage: bfloat16 (default, half the size, within one bf16 rounding) "
        "or float32 (lossless: base + residual gives instruct back bit for bit)",
    )
    add_codec(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="write the residual even if it is zero or nearly (INSTRUCT and BASE look like the same model)",
    )
    add_quiet(parser)
    add_publish(parser, "residual")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from hf_residual.ops.extract import extract

    started = time.perf_counter()
    result = extract(
        args.instruct,
        args.base,
        args.output,
        dtype=args.dtype,
        **codec_kwargs(args),
        instruct_revision=args.revision,
        base_revision=args.base_revision,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        force=args.force,
        progress=not args.quiet,
        **publish_kwargs(args),
    )
    if args.json:
        from hf_residual.commands._json import emit, residual_models, written

        seconds = time.perf_counter() - started
        emit(written("extract", result, seconds, models=residual_models(result.output)))
        return 0
    print_base(result.details)
    if print_fidelity(result):
        print_publication(result.details)
        return 0
    if result.details["lossless"]:
        lossless = "lossless, verified"
    elif result.details["codec"] == "float32":
        lossless = f"not lossless: {result.details['inexact_elements']} element(s) do not round-trip"
    else:
        lossless = "lossy: within one bfloat16 rounding"
    print(
        f"wrote residual {output_label(result)}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"{result.details['codec']} ({lossless})"
    )
    print_publication(result.details)
    return 0
