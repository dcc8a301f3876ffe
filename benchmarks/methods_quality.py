"""What each merge method does to the demo's port: instruction following and new knowledge, one line each.

Uses a demo folder built by ``hf-residual demo -o DIR`` (its base, instruct and CPT'd models), ports the
instruct residual onto each CPT'd base with every method (``hf_residual.port``), and scores the result on
the demo's own probes (``hf_residual.tune.probes.demo_probes``: held-out format prompts, strict IF, and
exact completion of corpus B's facts). The CPT'd base and the instruct model are scored too, for scale.

    hf-residual demo -o /tmp/demo && python benchmarks/methods_quality.py /tmp/demo --seed 0
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

VARIANTS = [
    ("task_arithmetic", 1.0),
    ("task_arithmetic", 1.2),
    ("orthogonal", 1.0),
    ("orthogonal", 1.2),
    ("ties:density=0.5", 1.0),
    ("ties:density=0.2", 1.0),
    ("dare:p=0.5,seed=0", 1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a folder written by hf-residual demo -o")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from hf_residual import port
    from hf_residual.tune.probes import demo_probes
    from hf_residual.tune.scoring import score

    models = args.demo / "models"
    probes = demo_probes(args.profile, args.seed)
    cpts = sorted(p for p in models.iterdir() if p.is_dir() and p.name.startswith("cpt-base"))
    print(f"demo {args.profile}, seed {args.seed}: IF strict / new knowledge (B facts, exact completion)")
    for name in ("instruct", *[c.name for c in cpts]):
        s = score(models / name, probes, tokenizer=models / "instruct")
        print(f"  {name:<28} {s['if']:.2f} / {s['knowledge']:.2f}")
    with tempfile.TemporaryDirectory() as scratch:
        for cpt in cpts:
            for method, alpha in VARIANTS:
                out = Path(scratch) / "ported"
                port(
                    models / "instruct",
                    cpt,
                    out,
                    base=models / "base",
                    alpha=alpha,
                    method=method,
                    progress=False,
                )
                s = score(out, probes)
                print(
                    f"  {cpt.name} + {method} alpha {alpha:<5} {s['if']:.2f} / {s['knowledge']:.2f}",
                    flush=True,
                )
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
