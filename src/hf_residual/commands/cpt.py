"""``hf-residual cpt``: continual pre-training from a YAML config (see docs/CPT.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cpt",
        help="continually pre-train a model on a packed corpus (transformers Trainer), porting each checkpoint",
        description=(
            "Continual pre-training with the transformers Trainer on a corpus packed with per-document "
            "attention; re-warmed and re-decayed learning rate (cosine or warmup-stable-decay), optional "
            "replay of old data, checkpoints, Hub pushes, and callbacks that port every checkpoint with an "
            "instruction residual and log instruction drift. Multi-GPU: accelerate launch --config_file "
            "FSDP.yaml -m hf_residual.cli cpt --config cpt.yaml (docs/CPT.md). "
            "Example: hf-residual cpt --config cpt.yaml"
        ),
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="the run's settings (docs/CPT.md)")
    parser.add_argument("--output-dir", metavar="DIR", help="override output_dir of the config")
    parser.add_argument("--max-steps", type=int, metavar="N", help="override max_steps of the config")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="resume from the last checkpoint in output_dir, or from CHECKPOINT",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_residual.cpt.config import load_config
    from hf_residual.cpt.train import run_cpt

    overrides = {
        key: value
        for key, value in (
            ("output_dir", args.output_dir),
            ("max_steps", args.max_steps),
            ("resume_from_checkpoint", args.resume),
        )
        if value is not None
    }
    result = run_cpt(load_config(args.config, overrides))
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    print(
        f"trained {result.global_step} steps on {result.rows} packed rows, mean loss {loss}: {result.output_dir}"
    )
    for folder in result.ported:
        print(f"ported checkpoint: {folder}")
    for step, error in result.port_failures:
        print(f"porting failed at step {step}: {error}")
    return 0
