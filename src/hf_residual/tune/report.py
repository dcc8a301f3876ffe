"""The Pareto front of the evaluated candidates, the choice among it, and the files that show it.

Choosing: a candidate is taken only when it *dominates* the paper's port (alpha = 1, task arithmetic): no
worse on either probe and better on one. Among those on the front, ``balanced`` takes the largest
combined gain (each probe's gain divided by that probe's spread over all candidates, so a log-likelihood
and a share weigh alike), ``if`` the largest IF gain, ``knowledge`` the largest knowledge gain. When none
dominates, alpha = 1 is kept: tune never hands back a port worse than the default on either probe.
"""

from __future__ import annotations

import json
from pathlib import Path

PREFERENCES = ("balanced", "if", "knowledge")


def dominates(a: dict, b: dict) -> bool:
    """``a`` is no worse than ``b`` on both probes and better on one."""
    return (
        a["if"] >= b["if"]
        and a["knowledge"] >= b["knowledge"]
        and (a["if"], a["knowledge"])
        != (
            b["if"],
            b["knowledge"],
        )
    )


def pareto_front(records: list[dict]) -> list[dict]:
    """The records no other record dominates (one per distinct score pair), by IF descending."""
    front, seen = [], set()
    for r in records:
        point = (r["if"], r["knowledge"])
        if point not in seen and not any(dominates(o, r) for o in records):
            seen.add(point)
            front.append(r)
    return sorted(front, key=lambda r: (-r["if"], -r["knowledge"]))


def _spread(records: list[dict], probe: str) -> float:
    values = [r[probe] for r in records]
    return (max(values) - min(values)) or 1.0


def choose(records: list[dict], reference: dict, prefer: str = "balanced") -> dict:
    """The chosen record: the front point dominating ``reference`` (alpha = 1) that ``prefer`` ranks first."""
    if prefer not in PREFERENCES:
        from hf_residual.errors import ConfigError

        raise ConfigError(f"unknown preference {prefer!r}; choose one of {', '.join(PREFERENCES)}")
    better = [r for r in pareto_front(records) if dominates(r, reference)]
    if not better:
        return reference
    s_if, s_know = _spread(records, "if"), _spread(records, "knowledge")

    def rank(r: dict) -> tuple[float, float]:
        d_if, d_know = (r["if"] - reference["if"]) / s_if, (r["knowledge"] - reference["knowledge"]) / s_know
        return {"balanced": (d_if + d_know, d_if), "if": (d_if, d_know), "knowledge": (d_know, d_if)}[prefer]

    return max(better, key=rank)


def _settings(record: dict) -> str:
    """The candidate in words: alpha, the group factors that are not 1 (else its regexes), the method."""
    c, params = record["candidate"], record.get("params") or {}
    factors = {k[2:]: v for k, v in params.items() if k.startswith("x_") and v != 1.0}
    if factors or not c["alpha_for"]:
        parts = [f"alpha {c['alpha']:g}"] + [f"{group} ×{v:g}" for group, v in factors.items()]
    else:
        parts = [f"alpha {c['alpha']:g}"] + [f"`{p}`={v:g}".replace("|", "\\|") for p, v in c["alpha_for"]]
    if c["method"] != "task_arithmetic":
        parts.append(c["method"])
    return ", ".join(parts)


def _fmt(value: float, kind: str) -> str:
    return f"{value:.3f}" if kind == "qa" or kind == "if" else f"{value:.4f}"


def markdown(front: list[dict], reference: dict, chosen: dict, references: dict, knowledge_kind: str) -> str:
    """The front as a markdown table, alpha = 1 and the reference models below it."""
    know = "knowledge (exact completion)" if knowledge_kind == "qa" else "knowledge (mean log-likelihood)"
    lines = [
        f"| # | IF strict | {know} | ΔIF vs α=1 | Δknowledge vs α=1 | settings | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = list(front) + ([] if reference in front else [reference])
    for i, r in enumerate(rows, 1):
        mark = []
        if r is chosen:
            mark.append("**chosen**")
        if r is reference:
            mark.append("α = 1 (the paper)")
        elif dominates(r, reference):
            mark.append("dominates α = 1")
        lines.append(
            f"| {i} | {_fmt(r['if'], 'if')} | {_fmt(r['knowledge'], knowledge_kind)} | "
            f"{r['if'] - reference['if']:+.3f} | {r['knowledge'] - reference['knowledge']:+.4f} | "
            f"{_settings(r)} | {'; '.join(mark)} |"
        )
    for name, r in references.items():
        lines.append(
            f"| {name} | {_fmt(r['if'], 'if')} | {_fmt(r['knowledge'], knowledge_kind)} | | | reference model | |"
        )
    return "\n".join(lines) + "\n"


def figure(
    records: list[dict], front: list[dict], reference: dict, chosen: dict, references: dict, kind: str
):
    """IF against knowledge: every candidate, the front joined, alpha = 1 and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    ax.scatter(
        [r["knowledge"] for r in records], [r["if"] for r in records], s=18, c="0.7", label="candidates"
    )
    line = sorted(front, key=lambda r: r["knowledge"])
    ax.plot([r["knowledge"] for r in line], [r["if"] for r in line], "o-", c="tab:blue", label="Pareto front")
    ax.scatter(
        [reference["knowledge"]], [reference["if"]], marker="*", s=220, c="tab:red", label="α = 1 (the paper)"
    )
    ax.scatter(
        [chosen["knowledge"]], [chosen["if"]], s=160, facecolors="none", edgecolors="k", label="chosen"
    )
    labels = {"instruct": "instruct model", "target": "target (not ported)"}
    for name, r in references.items():
        ax.scatter([r["knowledge"]], [r["if"]], marker="x", s=60, label=labels.get(name, name))
    ax.set_xlabel(
        "knowledge (exact completion)" if kind == "qa" else "knowledge (mean log-likelihood / token)"
    )
    ax.set_ylabel("instruction following (IF strict)")
    ax.set_title("hf-residual tune: instruction following vs knowledge")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def write(
    output: Path, records: list[dict], reference: dict, chosen: dict, references: dict, kind: str
) -> dict:
    """``pareto.md``, ``pareto.json`` and ``pareto.png`` in ``output``; returns their paths by name."""
    front = pareto_front(records)
    files = {
        "markdown": output / "pareto.md",
        "json": output / "pareto.json",
        "figure": output / "pareto.png",
    }
    files["markdown"].write_text(markdown(front, reference, chosen, references, kind))
    data = {
        "knowledge_kind": kind,
        "reference": reference,
        "chosen": chosen,
        "front": front,
        "candidates": records,
        "references": references,
    }
    files["json"].write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    figure(records, front, reference, chosen, references, kind).savefig(files["figure"], dpi=110)
    return {name: str(path) for name, path in files.items()}
