"""The comparison table of the paper (Tables 2-4) built from stored lm-eval results.

Rows are benchmark/metric pairs grouped by category (instruction following, reasoning, truthfulness), with
a sub-average per category and an overall average over every row, as in the paper; columns are models.
Values are percentages (lm-eval reports fractions). A value computed with ``--limit`` (a subset of a task's
examples), and every average it enters, is marked ``†`` and the table ends with a note saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.errors import ConfigError
from hf_residual.evaluation.store import ResultsStore
from hf_residual.evaluation.suites import CATEGORIES, OTHER

SKIP_KEYS = {"name", "alias", "sample_len", " "}
LIMITED = "†"

# What the short metric names of the suites mean: IFEval's four as in Jindal et al. 2024 (Section 4) and
# Zhou et al. 2023, the others as lm-eval computes them; lm-eval's own names (``--tasks``) alike.
METRIC_LEGEND = {
    "ILL_acc": "instruction-level loose accuracy (% of single instructions followed)",
    "ILS_acc": "instruction-level strict accuracy (% of single instructions followed)",
    "PLL_acc": "prompt-level loose accuracy (% of prompts with every instruction followed)",
    "PLS_acc": "prompt-level strict accuracy (% of prompts with every instruction followed)",
    "EM": "exact match of the answer extracted from the response",
    "strict-EM": "exact match only with the answer in the required format",
    "acc_n": "accuracy with log-likelihoods normalised by answer length",
}
METRIC_LEGEND |= {
    "inst_level_loose_acc": METRIC_LEGEND["ILL_acc"],
    "inst_level_strict_acc": METRIC_LEGEND["ILS_acc"],
    "prompt_level_loose_acc": METRIC_LEGEND["PLL_acc"],
    "prompt_level_strict_acc": METRIC_LEGEND["PLS_acc"],
    "acc_norm": METRIC_LEGEND["acc_n"],
}
LOOSE_NOTE = "strict checks the response as is, loose also with markdown or its first or last line removed"


@dataclass(frozen=True)
class Row:
    category: str
    benchmark: str
    metric: str
    task: str
    key: str


@dataclass
class Table:
    """Values in percent: ``values[(row.task, row.key)][model]``; models in column order; ``limits`` the
    ``--limit`` of the values computed with one (same keys)."""

    models: list[str]
    rows: list[Row]
    values: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    limits: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)
    repo_ids: dict[str, str | None] = field(default_factory=dict)

    def value(self, row: Row, model: str) -> float | None:
        return self.values.get((row.task, row.key), {}).get(model)

    def categories(self) -> list[str]:
        present = {r.category for r in self.rows}
        return [c for c in (*CATEGORIES, OTHER) if c in present]

    def average(self, model: str, category: str | None = None) -> float | None:
        """Mean of the model's values over a category's rows (all rows for ``None``)."""
        found = [
            v for r in self.rows if category in (None, r.category) and (v := self.value(r, model)) is not None
        ]
        return sum(found) / len(found) if found else None

    def limit(self, row: Row, model: str) -> int | None:
        """The ``--limit`` the value was computed with; None for a full run (or no value)."""
        return self.limits.get((row.task, row.key), {}).get(model)

    def limited(self, model: str, category: str | None = None) -> bool:
        """Whether any value of the model in a category (all rows for ``None``) comes from a limited run."""
        return any(
            self.limit(r, model) is not None and self.value(r, model) is not None
            for r in self.rows
            if category in (None, r.category)
        )

    def limit_values(self) -> list[int]:
        return sorted({n for by_model in self.limits.values() for n in by_model.values()})


def metric_value(lm_eval: dict, task: str, key: str) -> float | None:
    for section in ("groups", "results"):
        value = (lm_eval.get(section) or {}).get(task, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def metric_labels(record: dict) -> dict[str, str]:
    """The task spec's metrics, or (``--tasks``) every numeric metric lm-eval reported."""
    spec = record["task"]
    if spec["metrics"]:
        return spec["metrics"]
    reported = record["lm_eval"].get("results", {}).get(spec["task"], {})
    return {
        key: key.removesuffix(",none")
        for key, value in reported.items()
        if key not in SKIP_KEYS and "_stderr" not in key and isinstance(value, (int, float))
    }


def build_table(results_dirs: list[str | Path]) -> Table:
    """Gather every stored result of the folders into one table (later folders' models to the right)."""
    table = Table([], [])
    order: dict[Row, tuple] = {}
    for folder in results_dirs:
        for record in ResultsStore(folder).records():
            model = record["model"]
            label = model["label"]
            if label in table.shas and table.shas[label] != model["sha"]:
                label = f"{label} ({Path(folder).name})"
            if label not in table.models:
                table.models.append(label)
                table.shas[label], table.repo_ids[label] = model["sha"], model.get("repo_id")
            spec = record["task"]
            for i, (key, metric) in enumerate(metric_labels(record).items()):
                row = Row(spec["category"], spec["label"], metric, spec["task"], key)
                order.setdefault(row, (record.get("position", 0), i))
                value = metric_value(record["lm_eval"], spec["task"], key)
                if value is not None:
                    table.values.setdefault((row.task, row.key), {})[label] = 100 * value
                    limit = (record.get("settings") or {}).get("limit")
                    if limit is not None:
                        table.limits.setdefault((row.task, row.key), {})[label] = limit
    if not table.models:
        raise ConfigError(
            f"no evaluation results in {', '.join(map(str, results_dirs))}; run `hf-residual eval` first"
        )
    categories = [*CATEGORIES, OTHER]
    table.rows = sorted(order, key=lambda r: (categories.index(r.category), *order[r]))
    return table


def _cells(values: list[float | None], limited: list[bool] | None = None) -> list[str]:
    """Formatted values, the best of the row in bold when there is more than one model; ``†`` after a
    value from a limited run."""
    present = [v for v in values if v is not None]
    best = max(present) if len(present) > 1 and len({round(v, 2) for v in present}) > 1 else None
    marks = [LIMITED if mark else "" for mark in limited or [False] * len(values)]
    return [
        "n/a"
        if v is None
        else (f"**{v:.2f}**" if best is not None and round(v, 2) == round(best, 2) else f"{v:.2f}") + mark
        for v, mark in zip(values, marks, strict=True)
    ]


def limit_note(table: Table) -> str:
    """The note under a table with limited values ("" when every value comes from a full run)."""
    limits = table.limit_values()
    if not limits:
        return ""
    return (
        f"{LIMITED} limited run: --limit {', '.join(map(str, limits))} "
        f"({' or '.join(map(str, limits))} example{'s' if limits != [1] else ''} per task); not comparable to "
        "full runs."
    )


def legend(table: Table) -> dict[str, str]:
    """The meaning of each abbreviated metric of the table, in row order."""
    return {r.metric: METRIC_LEGEND[r.metric] for r in table.rows if r.metric in METRIC_LEGEND}


def legend_line(table: Table) -> str:
    """One line explaining the table's abbreviated metrics ("" when it has none)."""
    found = legend(table)
    if not found:
        return ""
    loose = any("loose" in meaning for meaning in found.values())
    return (
        "Metrics: "
        + "; ".join(f"{metric} = {meaning}" for metric, meaning in found.items())
        + (f"; {LOOSE_NOTE}." if loose else ".")
    )


def to_markdown(table: Table) -> str:
    """The table as GitHub Markdown: a sub-average per category, an overall average; best per row in bold."""
    head = ["Benchmark", "Metric", *table.models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * len(table.models)]
    for category in table.categories():
        for row in (r for r in table.rows if r.category == category):
            cells = _cells(
                [table.value(row, m) for m in table.models],
                [table.limit(row, m) is not None for m in table.models],
            )
            lines.append(f"| {row.benchmark} | {row.metric} | " + " | ".join(cells) + " |")
        averages = _cells(
            [table.average(m, category) for m in table.models],
            [table.limited(m, category) for m in table.models],
        )
        lines.append(f"| *{category.capitalize()}* | *sub-average* | " + " | ".join(averages) + " |")
    overall = _cells([table.average(m) for m in table.models], [table.limited(m) for m in table.models])
    lines.append("| **Overall** | **average** | " + " | ".join(overall) + " |")
    notes = [line for line in (legend_line(table), limit_note(table)) if line]
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def to_dict(table: Table) -> dict:
    """The table as plain data (``--json``): rows with their values per model in percent, the ``--limit``
    of limited values, averages per category and overall, and the legend of the metric names."""
    return {
        "models": [
            {"label": m, "sha": table.shas.get(m), "repo_id": table.repo_ids.get(m)} for m in table.models
        ],
        "rows": [
            {
                "category": row.category,
                "benchmark": row.benchmark,
                "metric": row.metric,
                "task": row.task,
                "key": row.key,
                "values": {m: v for m in table.models if (v := table.value(row, m)) is not None},
                "limits": {m: n for m in table.models if (n := table.limit(row, m)) is not None},
            }
            for row in table.rows
        ],
        "averages": {
            m: {c or "overall": table.average(m, c) for c in (*table.categories(), None)}
            for m in table.models
        },
        "limited": bool(table.limit_values()),
        "legend": legend(table),
    }


def delta_values(table: Table, reference: str | None = None) -> list[dict]:
    """What ``deltas`` says, as data: each model minus ``reference`` (default: the first column), in points,
    per category and overall."""
    reference = reference or (table.models[0] if table.models else None)
    if reference is not None and reference not in table.models:
        raise ConfigError(f"--reference {reference!r}: not a model of the table ({', '.join(table.models)})")
    found = []
    for model in (m for m in table.models if m != reference):
        differences = {}
        for category in (*table.categories(), None):
            a, b = table.average(model, category), table.average(reference, category)
            if a is not None and b is not None:
                differences[category or "overall"] = a - b
        limited = table.limited(model) or table.limited(reference)
        found.append({"model": model, "reference": reference, "averages": differences, "limited": limited})
    return found


def deltas(table: Table, reference: str | None = None, top: int = 3) -> str:
    """One line per model against ``reference`` (default: the first column): averages and largest changes."""
    if not table.models:
        return ""
    reference = reference or table.models[0]
    if reference not in table.models:
        raise ConfigError(f"--reference {reference!r}: not a model of the table ({', '.join(table.models)})")
    lines = []
    for model in (m for m in table.models if m != reference):
        parts = []
        for category in (None, *table.categories()):
            a, b = table.average(model, category), table.average(reference, category)
            if a is not None and b is not None:
                parts.append(f"{a - b:+.1f} {category or 'average'}")
        changes = [
            (a - b, row)
            for row in table.rows
            if (a := table.value(row, model)) is not None and (b := table.value(row, reference)) is not None
        ]
        changes.sort(key=lambda c: -abs(c[0]))
        largest = ", ".join(f"{row.benchmark} {row.metric} {d:+.1f}" for d, row in changes[:top])
        limited = table.limited(model) or table.limited(reference)
        lines.append(
            f"{model} vs {reference}: {', '.join(parts)}"
            + (f"; largest: {largest}" if largest else "")
            + (f" ({LIMITED} from limited runs: not comparable)" if limited else "")
        )
    return "\n".join(lines) + ("\n" if lines else "")
