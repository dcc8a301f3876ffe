"""``hf-residual extract``: write the residual instruct - base to a residual folder."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import MODEL_HELP, add_output, add_quiet, human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "extract",
        help="compute R = instruct - base once and save it as a residual folder",
        description=(
            "Compute the instruction residual R = INSTRUCT - BASE, tensor by tensor (float32 math), and write "
            "a residual folder: sharded safetensors with an index, a manifest (residual.json) with checksums, "
            "the instruct model's tokenizer, chat template and generation config, and a model card."
        ),
    )
    parser.add_argument("instruct", metavar="INSTRUCT", help=f"the instruction-tuned model: {MODEL_HELP}")
    parser.add_argument(
        "--base", required=True, metavar="BASE", help=f"the model INSTRUCT was tuned from: {MODEL_HELP}"
    )
    add_output(parser, "residual folder")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="residual storage: bfloat16 (default, half the size, within one bf16 rounding) "
        "or float32 (lossless: base + residual gives instruct back bit for bit)",
    )
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual import api

    result = api.extract(
        args.instruct,
        args.base,
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if result.details["lossless"]:
        lossless = "lossless, verified"
    elif result.details["codec"] == "float32":
        lossless = f"not lossless: {result.details['inexact_elements']} element(s) do not round-trip"
    else:
        lossless = "lossy: within one bfloat16 rounding"
    print(
        f"wrote residual {result.output}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
        f"{result.details['codec']} ({lossless})"
    )
    return 0
