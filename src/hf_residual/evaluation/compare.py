"""``hf-residual compare``: results folders -> comparison.md (table + deltas), deltas.txt, one PNG per category.

Everything is computed before the first file is written, so bad input leaves the report folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_residual.evaluation.table import Table, build_table, deltas, to_markdown

TABLE_FILE = "comparison.md"
DELTAS_FILE = "deltas.txt"


@dataclass
class Report:
    table: Table
    markdown: str
    deltas: str
    files: list[Path]


def report_markdown(table: Table, delta_text: str, plots: list[str] = ()) -> str:
    parts = ["# Evaluation comparison", "", to_markdown(table)]
    parts += [
        "Scores in %, best of each row in **bold**. Sub-averages per category; the overall average is the",
        "mean of every row, as in Jindal et al. 2024 (Tables 2-4).",
        "",
    ]
    if delta_text:
        parts += ["## Deltas", "", "```", delta_text.rstrip(), "```", ""]
    parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


def compare(
    results_dirs: list[str | Path], report_dir: str | Path, *, reference: str | None = None
) -> Report:
    from hf_residual.evaluation.plots import category_figure, slug

    table = build_table(results_dirs)
    delta_text = deltas(table, reference)
    figures = {f"{slug(c)}.png": category_figure(table, c) for c in table.categories()}
    markdown = report_markdown(table, delta_text, list(figures))
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=120)
        files.append(folder / name)
    (folder / TABLE_FILE).write_text(markdown, encoding="utf-8")
    (folder / DELTAS_FILE).write_text(delta_text, encoding="utf-8")
    files += [folder / TABLE_FILE, folder / DELTAS_FILE]
    return Report(table, markdown, delta_text, files)
