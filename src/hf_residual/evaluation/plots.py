"""Bar charts of a comparison, one PNG per category, like the paper's Figure 1 (matplotlib, Agg backend)."""

from __future__ import annotations

import re
from pathlib import Path

from hf_residual.evaluation.table import Table


def category_figure(table: Table, category: str):
    """Grouped bars: one group per benchmark/metric row, one bar per model (a missing value draws no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [r for r in table.rows if r.category == category]
    figure = Figure(figsize=(max(4.0, 1.2 * len(rows) * max(1, len(table.models)) / 2 + 2), 3.6))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(table.models))
    for i, model in enumerate(table.models):
        xs = [j + (i - (len(table.models) - 1) / 2) * width for j, r in enumerate(rows)]
        values = [table.value(r, model) for r in rows]
        present = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if present:
            axes.bar([x for x, _ in present], [v for _, v in present], width, label=model)
    axes.set_xticks(range(len(rows)), [f"{r.benchmark}\n{r.metric}" for r in rows], fontsize=8)
    axes.set_ylabel("score (%)")
    axes.set_title(category.capitalize())
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def slug(category: str) -> str:
    return re.sub(r"\W+", "-", category.lower()).strip("-")


def write_plots(table: Table, folder: Path) -> list[Path]:
    paths = []
    for category in table.categories():
        path = folder / f"{slug(category)}.png"
        category_figure(table, category).savefig(path, dpi=120)
        paths.append(path)
    return paths
