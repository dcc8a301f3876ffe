"""``hf-residual tune``: search alpha, per-group alpha and merge method for the best port on two probes."""

from __future__ import annotations

import argparse
import sys

from hf_residual.commands._common import MODEL_HELP, add_quiet
from hf_residual.commands._json import add_json

DIMENSIONS = ("alpha", "groups", "method")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tune",
        help="search the port's settings (alpha, per-group alpha, merge method) for instruction following "
        "and knowledge; writes the Pareto front and a recipe for `port --recipe`",
        description=(
            "Port INSTRUCT - BASE onto TARGET with many settings and score each port on two local probes: "
            "instruction following (chat prompts with verifiable instructions, judged by code) and knowledge "
            "(held-out CPT text by mean log-likelihood, or prompt/answer pairs by exact completion). A seeded "
            "multi-objective Optuna search (TPE) proposes the settings: global alpha, alpha factors for "
            "embeddings/head, attention, MLP and early/middle/late layers (written as --alpha-for regexes), "
            "and the merge method (task_arithmetic, ties with its density, dare with its p); alpha = 1 "
            "(the paper's port) is always the first candidate. Each candidate is ported by the same engine "
            "as `hf-residual port` into OUTPUT/scratch, scored, and deleted; scores are cached in "
            "OUTPUT/cache.jsonl, so a re-run or a resumed run evaluates only what it has not seen. OUTPUT "
            "gets pareto.md, pareto.json, pareto.png and recipe.yaml, the choice: the front point that "
            "dominates alpha = 1 with the largest gain (see --prefer), else alpha = 1. Example: hf-residual "
            "tune my-org/instruct --base my-org/base --target my-org/cpt -o tune-out --knowledge-text "
            "held-out.txt --budget 24; then hf-residual port my-org/instruct --to my-org/cpt --recipe "
            "tune-out/recipe.yaml -o ported"
        ),
    )
    parser.add_argument("instruct", metavar="INSTRUCT", help=f"the instruction-tuned model: {MODEL_HELP}")
    parser.add_argument(
        "--base", required=True, metavar="BASE", help=f"the model INSTRUCT was tuned from: {MODEL_HELP}"
    )
    parser.add_argument(
        "--target",
        required=True,
        metavar="TARGET",
        help=f"the continually pre-trained model to port to: {MODEL_HELP}",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="folder for the cache, the Pareto front and recipe.yaml",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=24,
        metavar="N",
        help="distinct candidates in all, alpha = 1 first (default: 24; a repeated proposal is not counted); "
        "a re-run with a larger N continues the search",
    )
    parser.add_argument(
        "--if-prompts",
        metavar="FILE",
        help='JSONL of {"prompt": ..., "instructions": [{"id": "uppercase"}, ...]} (the offline-if format, '
        "ids of hf_residual.evaluation.verifiers); default: the offline-if suite's 24 prompts",
    )
    knowledge = parser.add_mutually_exclusive_group()
    knowledge.add_argument(
        "--knowledge-text",
        metavar="FILE",
        help='held-out text of the CPT corpus (documents split by blank lines, or JSONL of {"text": ...}), '
        "scored by mean log-likelihood per token",
    )
    knowledge.add_argument(
        "--knowledge-qa",
        metavar="FILE",
        help='JSONL of {"prompt": ..., "answer": ...}: scored by exact completion of the answer',
    )
    knowledge.add_argument(
        "--demo-probes",
        metavar="PROFILE[:SEED]",
        help="the probes of `hf-residual demo` for its family (e.g. quick:0): held-out format prompts and "
        "corpus B's facts; replaces --if-prompts",
    )
    parser.add_argument(
        "--space",
        default=",".join(DIMENSIONS),
        metavar="DIMS",
        help="comma-separated dimensions to search: alpha, groups, method (default: all three)",
    )
    parser.add_argument(
        "--prefer",
        choices=("balanced", "if", "knowledge"),
        default="balanced",
        help="among front points that dominate alpha = 1: the largest combined gain (balanced, default), "
        "the largest IF gain (if), or the largest knowledge gain (knowledge)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler (default: 0)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="reply length limit of the IF probe (default: 64)",
    )
    parser.add_argument(
        "--port-to",
        metavar="DIR",
        help="also port the chosen recipe into DIR (overwritten), the recipe in its card",
    )
    parser.add_argument(
        "--device",
        help="torch device for scoring (default: cuda when available, else cpu); part of the cache key",
    )
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="do not score the instruct model and the target themselves (shown beside the front)",
    )
    add_quiet(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _probes(args: argparse.Namespace):
    from hf_residual.errors import ConfigError
    from hf_residual.tune import probes

    if args.demo_probes:
        if args.if_prompts:
            raise ConfigError("--demo-probes brings its own instruction prompts: leave out --if-prompts")
        profile, _, seed = args.demo_probes.partition(":")
        if seed and not seed.isdigit():
            raise ConfigError(f"--demo-probes takes PROFILE[:SEED], e.g. quick:0; got {args.demo_probes!r}")
        return probes.demo_probes(profile, int(seed or 0))
    return probes.from_files(args.if_prompts, args.knowledge_text, args.knowledge_qa, args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    from hf_residual.tune import tune

    def log(message: str) -> None:
        print(message, file=sys.stderr if args.json else sys.stdout)

    result = tune(
        args.instruct,
        args.base,
        args.target,
        probes=_probes(args),
        budget=args.budget,
        output=args.output,
        space=tuple(d.strip() for d in args.space.split(",") if d.strip()),
        seed=args.seed,
        prefer=args.prefer,
        port_to=args.port_to,
        references=not args.no_references,
        device=args.device,
        progress=not args.quiet,
        log=log,
    )
    if args.json:
        from hf_residual.commands._json import emit

        keys = ("chosen", "reference", "front", "references", "evaluated", "reused", "files", "seconds")
        emit({"command": "tune", "improved": result.improved, **{k: getattr(result, k) for k in keys}})
        return 0
    print((result.output / "pareto.md").read_text(), end="")
    verdict = "dominates alpha = 1" if result.improved else "nothing dominated alpha = 1: kept alpha = 1"
    print(f"chosen ({verdict}): IF {result.chosen['if']:.3f}, knowledge {result.chosen['knowledge']:.4f}")
    print(f"{result.evaluated} candidates evaluated, {result.reused} from the cache, {result.seconds:.1f} s")
    print("files: " + ", ".join(result.files.values()))
    return 0
