"""``hf-residual compare``: the paper's comparison table, deltas and bar charts from results folders."""

from __future__ import annotations

import argparse

from hf_residual.commands._json import add_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare",
        help="compare evaluated models: Markdown table, deltas, one PNG bar chart per category",
        description=(
            "Read the results of `hf-residual eval` and write REPORT_DIR/comparison.md (rows: benchmark and "
            "metric; columns: models; sub-averages for instruction following, reasoning and truthfulness, an "
            "overall average; best per row in bold), deltas.txt and one PNG bar chart per category."
        ),
    )
    parser.add_argument(
        "results", nargs="+", metavar="RESULTS_DIR", help="folder(s) written by hf-residual eval"
    )
    parser.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report")
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="model the deltas are measured against (default: the first column)",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.evaluation.compare import compare

    report = compare(args.results, args.output, reference=args.reference)
    if args.json:
        from pathlib import Path

        from hf_residual.commands._json import emit
        from hf_residual.evaluation.table import delta_values, to_dict

        emit(
            {
                "command": "compare",
                "report_dir": Path(args.output).absolute(),
                "files": [Path(p).absolute() for p in report.files],
                "table": to_dict(report.table),
                "deltas": delta_values(report.table, args.reference),
            }
        )
        return 0
    print(report.markdown.split("## Deltas")[0].split("\n", 2)[2].rstrip())
    if report.deltas:
        print("\n" + report.deltas.rstrip())
    print("\nwrote " + ", ".join(str(p) for p in report.files))
    return 0
