"""Variants of the demo profile (CPT learning rate, re-decay, replay of A, alpha, SFT), one line each.

Runs ``hf_residual.demo.run_demo`` per (seed, variant) in one folder per seed, so the base and instruct
models are built once per seed and only the stages a variant changes are rebuilt. Prints, per CPT size,
the ported model's IF strict, the CPT'd instruct model's, and the ported model's B-knowledge as a share of
the CPT'd base's; the figures in docs/DEMO.md come from this script.

    python benchmarks/demo_variants.py --profile quick --seeds 0 1 2 --variant cpt_lr=1e-4 \
        --variant 'cpt_lr=1e-4;cpt_decay="cosine"'
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path


def parse_variant(text: str) -> dict:
    changes = {}
    for part in filter(None, text.split(";")):
        name, _, value = part.partition("=")
        try:
            changes[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[name] = value
    if "shape" in changes:  # shape=(hidden, layers, heads, intermediate)
        from hf_residual.demo.training import ModelShape

        changes["shape"] = ModelShape(*changes["shape"])
    return changes


def main() -> None:
    from hf_residual.demo import get_profile, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", default=[], help="name=value[;name=value]")
    parser.add_argument("--output", default="/tmp/hf-residual-demo-variants")
    args = parser.parse_args()
    variants = args.variant or [""]
    for seed in args.seeds:
        for text in variants:
            prof = get_profile(args.profile).with_changes(**parse_variant(text))
            started = time.perf_counter()
            result = run_demo(
                Path(args.output) / f"{args.profile}-seed{seed}", profile=prof, seed=seed, log=lambda _: None
            )
            rows = {r["model"]: r for r in result.rows}
            cells = []
            for label in prof.labels:
                p, i, b = (rows[f"{k}-{label}"] for k in ("ported", "cpt-instruct", "cpt-base"))
                share = p["know_b"] / b["know_b"] if b["know_b"] else float("nan")
                cells.append(
                    f"{label}: IF {p['if_strict']:.2f} vs {i['if_strict']:.2f}, "
                    f"kB {p['know_b']:.2f}/{b['know_b']:.2f}={share:.0%}"
                )
            verdict = "PASS" if result.passed else "fail"
            print(
                f"seed {seed} [{text or 'default'}] instruct IF {rows['instruct']['if_strict']:.2f} | "
                + " | ".join(cells)
                + f" | {verdict} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
