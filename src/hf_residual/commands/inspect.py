"""``hf-residual inspect``: summarise model and residual folders."""

from __future__ import annotations

import argparse

from hf_residual.commands._common import MODEL_HELP, add_token, human_bytes
from hf_residual.commands._json import add_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect",
        help="summarise models or residuals: tensors, dtypes, size, per-layer |R| / |B|",
        description="Summarise each PATH. For a residual folder, also the relative norm |R| / |B| per layer.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help=f"models or residuals, each {MODEL_HELP}")
    parser.add_argument(
        "--revision", metavar="REV", help="Hub branch, tag or commit (for every PATH; or PATH@REV each)"
    )
    add_token(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.ops.inspect import inspect

    summaries = [inspect(path, revision=args.revision, token=args.token) for path in args.paths]
    if args.json:
        from hf_residual.commands._json import emit, summary_json

        emit(
            {
                "command": "inspect",
                "items": [summary_json(ref, s) for ref, s in zip(args.paths, summaries, strict=True)],
            }
        )
        return 0
    for summary in summaries:
        dtypes = ", ".join(f"{d}: {n:,} params" for d, n in sorted(summary.dtypes.items()))
        print(f"{summary.path} [{summary.kind}, {summary.model_type or 'unknown architecture'}]")
        print(f"  {summary.tensors} tensors, {human_bytes(summary.bytes)}; {dtypes}")
        if summary.manifest is not None:
            m = summary.manifest
            print(
                f"  residual of {m.instruct.repo_id or m.instruct.name} - {m.base.repo_id or m.base.name}; "
                f"codec {m.codec} ({'lossless' if m.lossless else 'lossy'})"
            )
            print("  |R| / |B| per layer:")
            for layer, ratio in summary.layer_norms.items():
                print(f"    {layer:>24}  {ratio:.4f}")
    return 0
