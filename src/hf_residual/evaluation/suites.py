"""Evaluation suites: which lm-eval tasks to run, with how many shots, and which metrics to report.

Suites are packaged data (``suites/*.yaml`` beside this module): ``paper`` (the paper's Table 1),
``quick`` (a smoke check) and ``offline-if`` (hf-residual's own tasks over local data, no Hub access).
``--tasks`` builds an ad-hoc suite from task names (``gsm8k:5`` sets the shots).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources

import yaml

from hf_residual.errors import ConfigError

CATEGORIES = ("instruction following", "reasoning", "truthfulness")
OTHER = "other"
LOCAL_PREFIX = "hfr_"  # hf-residual's own tasks (evaluation/tasks/), which need no Hub access


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task (or group) run with fixed shots; ``metrics`` maps lm-eval keys to table labels."""

    task: str
    label: str
    num_fewshot: int | None = None
    category: str = OTHER
    metrics: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    needs_hub: bool = True
    limit: int | None = None


def shots(num_fewshot: int | None) -> str:
    return "task default shots" if num_fewshot is None else f"{num_fewshot}-shot"


def available() -> list[str]:
    folder = resources.files("hf_residual.evaluation").joinpath("suites")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_suite(name: str) -> Suite:
    """A packaged suite by name."""
    if name not in available():
        raise ConfigError(f"--suite {name!r}: no such suite; choose one of {', '.join(available())}")
    text = resources.files("hf_residual.evaluation").joinpath("suites").joinpath(f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    tasks = tuple(TaskSpec(**task) for task in data["tasks"])
    return Suite(data["name"], data["description"], tasks, data.get("needs_hub", True), data.get("limit"))


def from_task_list(text: str) -> Suite:
    """``--tasks arc_easy,gsm8k:5``: every metric lm-eval reports, shots as the task's default unless given."""
    tasks = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise ConfigError(f"--tasks {item!r}: write TASK or TASK:SHOTS with SHOTS a number, e.g. gsm8k:5")
        tasks.append(TaskSpec(name, name, int(shots) if shots else None))
    if not tasks:
        raise ConfigError("--tasks: give at least one lm-eval task name, e.g. --tasks arc_easy,gsm8k:5")
    offline = all(t.task.startswith(LOCAL_PREFIX) for t in tasks)
    return Suite("tasks", "tasks given on the command line", tuple(tasks), needs_hub=not offline)
