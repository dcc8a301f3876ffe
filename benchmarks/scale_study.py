"""Port quality against model size: the demo's world and recipe (``quick``) at several model shapes.

Runs ``hf_residual.demo.run_demo`` once per shape (and seed) in its own folder, so a re-run reuses every
model already built, and reads, for each CPT size: the instruct model's IF, the CPT'd instruct model's IF,
the ported model's IF (alpha = 1, and the tuned recipe's when the demo has one), and the ported model's
B-knowledge as a share of the CPT'd base's. Prints one line per shape, writes the table (JSON and
Markdown) after each shape, and a figure of port quality against parameters at the end.

    nice -n 10 python benchmarks/scale_study.py --sizes 96x3 128x4 192x6 256x8 --seeds 0 \
        --output /tmp/hfr-scale --figure docs/scale_study.png

Shapes are HIDDENxLAYERS (4 heads, MLP width 2.75 x hidden rounded to 32); everything else is ``quick``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def shape_of(text: str):
    """``"128x4"`` -> the demo's ModelShape (4 heads, intermediate 2.75 x hidden rounded to 32)."""
    from hf_residual.demo.training import ModelShape

    hidden, _, layers = text.partition("x")
    h = int(hidden)
    return ModelShape(hidden=h, layers=int(layers), heads=4, intermediate=int(round(h * 2.75 / 32)) * 32)


def summarise(result, size: str) -> dict:
    """One shape's figures per CPT size, from the demo's rows (``tuned-*`` rows when the demo has them)."""
    import json as _json

    rows = {r["model"]: r for r in result.rows}
    info = _json.loads((result.output / "models" / "base" / "demo-stage.json").read_text())
    instruct_if = rows["instruct"]["if_strict"]
    out = {
        "size": size,
        "seed": result.seed,
        "parameters": info["parameters"],
        "instruct_if": instruct_if,
        "seconds": result.total_seconds,
        "cpt": {},
    }
    for name, row in rows.items():
        if not name.startswith("cpt-base-"):
            continue
        label = name.removeprefix("cpt-base-")
        cell = {
            "cpt_instruct_if": rows[f"cpt-instruct-{label}"]["if_strict"],
            "cpt_base_know_b": row["know_b"],
        }
        for kind in ("ported", "tuned"):
            if f"{kind}-{label}" in rows:
                r = rows[f"{kind}-{label}"]
                cell[f"{kind}_if"] = r["if_strict"]
                cell[f"{kind}_know_b"] = r["know_b"]
                cell[f"{kind}_if_share"] = r["if_strict"] / instruct_if if instruct_if else None
                cell[f"{kind}_know_share"] = r["know_b"] / row["know_b"] if row["know_b"] else None
        out["cpt"][label] = cell
    from hf_residual.demo import report

    if (docchat := report.docchat_check(result.rows)) is not None:
        out["docchat"] = {k: v for k, v in docchat.items() if k != "items"}
    return out


def line(summary: dict) -> str:
    cells = []
    for label, c in summary["cpt"].items():
        text = (
            f"{label}: IF {c['ported_if']:.2f} vs CPT'd instruct {c['cpt_instruct_if']:.2f}, "
            f"kB {c['ported_know_share']:.0%}"
        )
        if "tuned_if" in c:
            text += f" | tuned IF {c['tuned_if']:.2f}, kB {c['tuned_know_share']:.0%}"
        cells.append(text)
    return (
        f"{summary['size']} ({summary['parameters']:,} params, seed {summary['seed']}): "
        f"instruct IF {summary['instruct_if']:.2f} | " + " | ".join(cells) + f" ({summary['seconds']:.0f} s)"
    )


def markdown(summaries: list[dict]) -> str:
    """The table for docs/DEMO.md: one row per shape, seed and CPT size."""
    head = (
        "| shape | parameters | seed | CPT size | instruct IF | CPT'd instruct IF | ported IF (α = 1) | "
        "ported IF / instruct | kB kept (α = 1) | tuned IF | tuned kB kept |"
    )
    lines = [head, "|" + "---|" * 11]
    for s in summaries:
        for label, c in s["cpt"].items():
            tuned = (f"{c['tuned_if']:.2f}", f"{c['tuned_know_share']:.0%}") if "tuned_if" in c else ("", "")
            lines.append(
                f"| {s['size']} | {s['parameters']:,} | {s['seed']} | {label} | {s['instruct_if']:.2f} | "
                f"{c['cpt_instruct_if']:.2f} | {c['ported_if']:.2f} | {c['ported_if_share']:.0%} | "
                f"{c['ported_know_share']:.0%} | {tuned[0]} | {tuned[1]} |"
            )
    lines += [
        "",
        "| shape | parameters | seed | derived doc QA | derived + residual doc QA | derived IF | derived + residual IF |",
        "|" + "---|" * 7,
    ]
    for s in summaries:
        if d := s.get("docchat"):
            lines.append(
                f"| {s['size']} | {s['parameters']:,} | {s['seed']} | {d['skill_derived']:.2f} | "
                f"{d['skill_ported']:.2f} | {d['if_derived']:.2f} | {d['if_ported']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def figure(summaries: list[dict], path: Path) -> None:
    """Port quality against parameters: IF share of instruct, B-knowledge kept (per CPT size, alpha = 1 and
    tuned), and DocChat's doc-QA skill kept by derived + residual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    labels = sorted({label for s in summaries for label in s["cpt"]}, key="SML".find)
    colours = dict(zip(labels, ("tab:blue", "tab:orange", "tab:green"), strict=False))
    for ax, metric in ((axes[0], "if_share"), (axes[1], "know_share")):
        for label in labels:
            for kind, style, face in (("ported", "-o", None), ("tuned", "--s", "none")):
                points = sorted(
                    (s["parameters"], c[f"{kind}_{metric}"])
                    for s in summaries
                    if (c := s["cpt"].get(label)) and c.get(f"{kind}_{metric}") is not None
                )
                if points:
                    name = "α = 1" if kind == "ported" else "tuned (hollow; on α = 1 where equal)"
                    ax.plot(
                        *zip(*points, strict=True),
                        style,
                        color=colours.get(label),
                        markersize=5 if kind == "ported" else 10,
                        markerfacecolor=face,
                        label=f"{name}, CPT size {label}",
                    )
    docchat = sorted(
        (
            s["parameters"],
            s["docchat"]["skill_ported"] / s["docchat"]["skill_derived"],
            s["docchat"]["if_ported"],
        )
        for s in summaries
        if s.get("docchat") and s["docchat"]["skill_derived"]
    )
    if docchat:
        xs, kept, ifs = zip(*docchat, strict=True)
        axes[2].plot(xs, kept, "-o", color="tab:red", label="DocChat: derived + residual doc QA / derived's")
        axes[2].plot(xs, ifs, "-^", color="tab:purple", label="DocChat: derived + residual IF")
    axes[2].set_title("(c) DocChat in miniature (α = 1)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel("share")
        ax.set_ylim(0, 1.2)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0].set_title("(a) ported IF / instruct IF")
    axes[1].set_title("(b) ported B-knowledge / CPT'd base's")
    handles, names = axes[0].get_legend_handles_labels()
    more, more_names = axes[2].get_legend_handles_labels()
    fig.legend(handles + more, names + more_names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("hf-residual demo: port quality against model size (quick's world and recipe, seed 0)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from hf_residual.commands.demo import demo_tuner
    from hf_residual.demo import get_profile, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["96x3", "128x4", "192x6", "256x8"], help="HIDDENxLAYERS"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of world, data and init")
    parser.add_argument("--output", default="/tmp/hfr-scale", help="one demo folder per shape and seed here")
    parser.add_argument("--figure", default=None, help="PNG of port quality against size (default: OUTPUT/)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--tune-budget", type=int, default=None, help="tuned rows' budget (default: quick's)")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    summaries = []
    for size in args.sizes:
        for seed in args.seeds:
            prof = get_profile("quick").with_changes(name=f"scale-{size}", shape=shape_of(size))
            if args.tune_budget is not None:
                prof = prof.with_changes(tune_budget=args.tune_budget)
            # the world only depends on quick's entity counts, so quick's probes are this world's
            tuner = demo_tuner("quick", seed) if prof.tune_budget else None
            started = time.perf_counter()
            result = run_demo(
                output / f"{size}-seed{seed}",
                profile=prof,
                seed=seed,
                threads=args.threads,
                log=lambda _: None,
                tuner=tuner,
            )
            summary = summarise(result, size)
            summary["wall_s"] = round(time.perf_counter() - started, 1)
            summaries.append(summary)
            print(line(summary), flush=True)
            (output / "scale_study.json").write_text(json.dumps(summaries, indent=2) + "\n")
            (output / "scale_study.md").write_text(markdown(summaries))
    figure(summaries, Path(args.figure) if args.figure else output / "scale_study.png")
    print(markdown(summaries))


if __name__ == "__main__":
    main()
