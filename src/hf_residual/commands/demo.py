"""``hf-residual demo``: the method in miniature, built and run on this machine with nothing downloaded."""

from __future__ import annotations

import argparse

PROFILE_NAMES = ("quick", "full", "tiny")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="train a small model family on CPU and show the paper's pattern (nothing downloaded)",
        description=(
            "Build, on CPU and with nothing downloaded, a tokenizer and a small Llama family: a base "
            "pre-trained on corpus A (facts about fictional entities), an instruct model fine-tuned from it "
            "on chats with verifiable format instructions, the base and the instruct model continually "
            "pre-trained (CPT) on corpus B (new entities) at three sizes, and CPT'd base + (instruct - base) "
            "ported with the same engine as `hf-residual port`. Every model is evaluated on instruction "
            "following (format checked by code) and knowledge of A and B; the table, results.md, "
            "results.json and figure.png are written to the output folder with the models (ordinary "
            "transformers folders). quick and full also add tuned rows (`hf-residual tune` with a small budget, "
            "its recipe ported at every CPT size) and DocChat in miniature (the paper's Table 4: the base "
            "fine-tuned on answering from a passage, then given the residual; the skill measured by lm-eval "
            "as `hf-residual card --skill-tasks` expects). Built models are cached there and reused when settings match. "
            "Profiles: quick (default, under 2 minutes on 2 free cores), full (a model twice as large, "
            "ported at alpha 0.9, about 3 minutes; meets the required pattern on seeds 0-2, see docs/DEMO.md), "
            "tiny (seconds, tests)."
        ),
    )
    parser.add_argument(
        "-o", "--output", default="hf-residual-demo", metavar="DIR", help="folder for models and report"
    )
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="quick", help="run size (default: quick)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of world, data and init (default: 0)"
    )
    parser.add_argument("--rebuild", action="store_true", help="retrain every stage, ignoring cached models")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; more can be slower on a busy machine)",
    )
    parser.add_argument("--cpt-lr", type=float, metavar="LR", help="override the CPT peak learning rate")
    parser.add_argument(
        "--cpt-decay",
        choices=("constant", "cosine"),
        help="CPT schedule after re-warming: constant (one run, snapshots) or cosine re-decay (run per size)",
    )
    parser.add_argument(
        "--replay", type=float, metavar="SHARE", help="share of CPT rows replayed from corpus A"
    )
    parser.add_argument("--alpha", type=float, help="scale of the residual added to the CPT'd base")
    parser.add_argument(
        "--tune-budget",
        type=int,
        metavar="N",
        help="candidates `hf-residual tune` searches at the largest CPT size for the tuned rows "
        "(0: no tuned rows; default: the profile's, 4 in quick; needs the tune extra)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the required pattern is not met"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.demo import get_profile, report, run_demo

    overrides = {
        "cpt_lr": args.cpt_lr,
        "cpt_decay": args.cpt_decay,
        "cpt_replay": args.replay,
        "alpha": args.alpha,
        "tune_budget": args.tune_budget,
    }
    profile = get_profile(args.profile).with_changes(**{k: v for k, v in overrides.items() if v is not None})
    tuner = demo_tuner(args.profile, args.seed) if profile.tune_budget else None
    result = run_demo(
        args.output, profile=profile, seed=args.seed, rebuild=args.rebuild, threads=args.threads, tuner=tuner
    )
    print()
    environment = report.environment_text(result.environment)
    print(f"hf-residual demo, profile {result.profile}, seed {result.seed} ({environment})")
    print(report.text_table(result.rows))
    print()
    print(report.checks_text(result.checks))
    if docchat := report.docchat_text(report.docchat_check(result.rows)):
        print(docchat)
    print()
    for stage, seconds in result.timings.items():
        print(f"  {stage:<32} {seconds:7.1f} s")
    print(f"  {'total':<32} {result.total_seconds:7.1f} s")
    if result.reused:
        print(f"  reused cached models (settings unchanged): {', '.join(result.reused)}")
    print()
    print(f"models in {result.output / 'models'}; report: " + ", ".join(result.files.values()))
    return 1 if args.check and not result.passed else 0


def demo_tuner(profile: str, seed: int):
    """The demo's ``tuner``: ``hf_residual.tune.tune`` on the demo's own probes (its held-out format prompts
    and B's facts: the items the table reports, so the tuned rows are selected on them), seeded; None with
    a note when the tune extra (optuna) is missing."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        print(
            "note: no tuned rows: `hf-residual tune` needs the tune extra (pip install 'hf-residual[tune]')"
        )
        return None

    def tuner(instruct, base, target, output, budget: int):
        from hf_residual.tune import demo_probes, tune

        probes = demo_probes(profile, seed)
        found = tune(
            instruct,
            base,
            target,
            probes=probes,
            budget=budget,
            output=output,
            seed=seed,
            references=False,
            progress=False,
            log=lambda _: None,
        )
        return found.recipe

    return tuner
