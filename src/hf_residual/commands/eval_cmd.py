"""``hf-residual eval``: run lm-eval suites on models and store the results (re-runs reuse finished ones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_residual.commands._common import MODEL_HELP, add_token
from hf_residual.commands._json import add_json
from hf_residual.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from hf_residual.evaluation.suites import available

    parser = sub.add_parser(
        "eval",
        help="evaluate models with lm-evaluation-harness suites (paper, quick, offline-if)",
        description=(
            "Run EleutherAI's lm-evaluation-harness on each MODEL and store lm-eval's results JSON per model "
            "and task in RESULTS_DIR, keyed by the model's sha and the task settings: a re-run reuses finished "
            "results. Suites: paper (the paper's Table 1; needs the Hub's datasets), quick (a smoke check of "
            "it), offline-if (hf-residual's own instruction-following and multiple-choice tasks over data "
            "shipped with the package; no network needed)."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help=f"model to evaluate: {MODEL_HELP}")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", choices=available(), help="a packaged suite")
    which.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="lm-eval task names, comma-separated; TASK:SHOTS sets the shots (gsm8k:5)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="RESULTS_DIR", help="folder of the results")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of your own lm-eval task YAMLs (as lm-eval's --include_path), searched besides "
        "lm-eval's and hf-residual's tasks; repeatable. E.g. a skill task for `card --skill-tasks`",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate only N examples per task (smoke tests; not comparable)",
    )
    parser.add_argument("--batch-size", default="auto", help="lm-eval batch size: a number or auto (default)")
    parser.add_argument(
        "--device", help="torch device, e.g. cpu, cuda, cuda:0 (default: cuda when available, else cpu)"
    )
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="lm-eval model backend")
    parser.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "yes", "no"],
        help="apply the model's chat template to prompts: auto (default) = when the tokenizer has one",
    )
    parser.add_argument(
        "--gen-kwargs",
        metavar="K=V,...",
        help="override generation settings of generate_until tasks, lm-eval syntax (e.g. max_gen_toks=256)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show lm-eval's own messages and logs (on stderr); by default only hf-residual's progress, "
        "progress bars and results are shown",
    )
    add_token(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from hf_residual.evaluation.quiet import lm_eval_output
    from hf_residual.evaluation.runner import evaluate, task_manager
    from hf_residual.evaluation.suites import from_task_list, load_suite
    from hf_residual.evaluation.table import build_table, to_markdown

    started = time.perf_counter()
    suite = load_suite(args.suite) if args.suite else from_task_list(args.tasks)
    include = [Path(p) for p in args.include_path]
    for folder in include:
        if not folder.is_dir():
            raise ConfigError(
                f"--include-path {folder}: no such folder; give the folder that holds your task YAML files"
            )
    batch = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    screen = sys.stderr if args.json else sys.stdout  # our progress lines; lm-eval's are held back below

    def log(line: str) -> None:
        print(line, file=screen, flush=True)

    with lm_eval_output(verbose=args.verbose):
        result = evaluate(
            args.models,
            suite,
            args.output,
            limit=args.limit,
            batch_size=batch,
            device=args.device,
            backend=args.backend,
            chat_template=args.chat_template,
            gen_kwargs=args.gen_kwargs,
            token=args.token,
            manager=task_manager(include) if include else None,
            log=log,
        )
    if args.json:
        from hf_residual.commands._json import emit, eval_json

        emit(eval_json(result, suite, time.perf_counter() - started))
        return 0
    reused = sum(r.reused for r in result.runs)
    print(f"results in {result.results_dir}: {len(result.runs) - reused} run, {reused} reused")
    print(to_markdown(build_table([result.results_dir])), end="")
    return 0
