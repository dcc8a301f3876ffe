"""``hf-residual demo``: the method in miniature, built and run on this machine with nothing downloaded."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="build a small model family on CPU and port its instruction residual (nothing downloaded)",
        description="Build a small base / instruct / continually pre-trained family and port the residual.",
    )
    parser.add_argument("-o", "--output", default="hf-residual-demo", metavar="DIR", help="where to build it")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.demo import run_demo

    result = run_demo(args.output, seed=args.seed)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0
