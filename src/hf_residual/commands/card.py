"""``hf-residual card``: write evaluation results into a model card (model-index, table) and push it."""

from __future__ import annotations

import argparse
import logging

from hf_residual.commands._common import MODEL_HELP, add_token


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "card",
        help="write a model's evaluation results into its model card (and push it to the Hub)",
        description=(
            "Merge MODEL's results from `hf-residual eval` into its card: model-index entries the Hub displays, "
            ".eval_results/hf-residual.yaml for Hub benchmarks, and the comparison table in a marked section of "
            "the body that re-runs replace. The rest of the card is kept. A local folder's README.md is updated "
            "in place; a Hub repo's card is written to -o (default RESULTS_DIR/card) and, with --push, committed."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=f"the evaluated model: {MODEL_HELP}")
    parser.add_argument(
        "--results",
        nargs="+",
        required=True,
        metavar="RESULTS_DIR",
        help="folder(s) written by hf-residual eval",
    )
    parser.add_argument("-o", "--output", metavar="DIR", help="write README.md (and .eval_results/) here")
    parser.add_argument("--push", action="store_true", help="commit the updated card to the Hub repo MODEL")
    parser.add_argument("--create-pr", action="store_true", help="with --push: open a pull request instead")
    parser.add_argument(
        "--skill-tasks",
        default="",
        metavar="T1,T2",
        help="tasks that measure a derived model's own skill; without them its card says that skill was not measured",
    )
    add_token(parser)
    parser.set_defaults(func=run)


class _NoEmptyMetadataNotice(logging.Filter):
    """huggingface_hub logs that a card without a metadata block gets empty metadata: the card command is
    about to write that block, so there is nothing for the user to do about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Repo card metadata block was not found")


def run(args: argparse.Namespace) -> int:
    from hf_residual.evaluation.card import write_card

    notice = _NoEmptyMetadataNotice()
    logger = logging.getLogger("huggingface_hub.repocard")
    logger.addFilter(notice)
    try:
        update = write_card(
            args.model,
            args.results,
            output=args.output,
            push=args.push or args.create_pr,
            create_pr=args.create_pr,
            skill_tasks=[t for t in args.skill_tasks.split(",") if t],
            token=args.token,
        )
    finally:
        logger.removeFilter(notice)
    print(f"card of {args.model}: {len(update.results)} model-index result(s) from {update.model_label}")
    if update.not_measured:
        print("note: derived model; the card says its own skill was not measured (see --skill-tasks)")
    for path in update.written:
        print(f"wrote {path}")
    if update.pr_url:
        print(f"pull request: {update.pr_url}")
    elif update.commit_url:
        print(f"commit: {update.commit_url}")
    return 0
