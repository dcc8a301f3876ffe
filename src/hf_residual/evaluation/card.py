"""``hf-residual card``: write evaluation results into a model card without clobbering the rest of it.

Three things change, nothing else: the front matter's ``model-index`` (huggingface_hub ``EvalResult``
entries, merged: an entry for the same dataset and metric is replaced, others are kept), a section of
the body between markers (the comparison table, settings, and for derived models what was not measured;
a re-run replaces it), and ``.eval_results/hf-residual.yaml`` (the Hub's newer eval-results format) for
benchmarks that are Hub datasets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hf_residual.core.output import write_atomic
from hf_residual.errors import ConfigError
from hf_residual.evaluation.store import ResultsStore
from hf_residual.evaluation.suites import shots
from hf_residual.evaluation.table import build_table, metric_labels, metric_value, to_markdown

START = "<!-- hf-residual:eval:start -->"
END = "<!-- hf-residual:eval:end -->"
EVAL_RESULTS_FILE = ".eval_results/hf-residual.yaml"
SOURCE_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
SOURCE_NAME = "lm-evaluation-harness via hf-residual eval"
LOCAL_DATASET = "hf-residual/{task}"


@dataclass
class CardUpdate:
    """The updated card text, the eval-results YAML (or None), and where they were written or pushed."""

    text: str
    eval_results_yaml: str | None
    model_label: str
    results: list = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    commit_url: str | None = None
    pr_url: str | None = None
    not_measured: bool = False


def _matches(model: dict, ref: str) -> bool:
    if ref in (model["ref"], model.get("repo_id"), model["label"]):
        return True
    return Path(ref).expanduser().resolve() == Path(model["ref"]).expanduser().resolve()


def model_records(results_dirs: list[str | Path], ref: str) -> list[dict]:
    """Finished results of the model ``ref`` (its latest sha when it was evaluated more than once)."""
    records = [r for d in results_dirs for r in ResultsStore(d).records()]
    mine = [r for r in records if _matches(r["model"], ref)]
    if not mine:
        known = sorted({r["model"]["ref"] for r in records})
        raise ConfigError(
            f"no results for {ref!r} in {', '.join(map(str, results_dirs))} (it has: {', '.join(known) or 'none'}); "
            f"run `hf-residual eval {ref} --suite ... -o RESULTS_DIR` first"
        )
    latest = mine[-1]["model"]["sha"]
    return [r for r in mine if r["model"]["sha"] == latest]


# ``dataset_path`` values that name a ``datasets`` loader for local files (a task's own JSONL, CSV...),
# not a dataset on the Hub: such a task is recorded as a local one.
FILE_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "generator", "webdataset"}


def _dataset_path(record: dict) -> str | None:
    """The Hub dataset the record's task reads, or None for a task over local files."""
    task = record["task"]["task"]
    configs = record["lm_eval"].get("configs") or {}
    for name in [task, *sorted(configs)]:
        if name == task or name.startswith(task + "_"):
            path = (configs.get(name) or {}).get("dataset_path")
            if path:
                return None if path in FILE_LOADERS or Path(path).exists() else path
    return None


def eval_results(records: list[dict], model_name: str):
    """``EvalResult`` entries of one model's records (values in percent, as in the table)."""
    from huggingface_hub import EvalResult

    found = []
    for record in records:
        spec = record["task"]
        dataset = _dataset_path(record) or LOCAL_DATASET.format(task=spec["task"])
        n_shots = record["settings"]["num_fewshot"]
        limit = record["settings"].get("limit")
        args = {"num_few_shot": n_shots} if n_shots is not None else {}
        if limit is not None:  # a subset of the task's examples: said in the entry itself
            args["limit"] = limit
        for key, label in metric_labels(record).items():
            value = metric_value(record["lm_eval"], spec["task"], key)
            if value is None:
                continue
            metric, _, filtered = key.partition(",")
            found.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=dataset,
                    dataset_name=spec["label"],
                    dataset_args=args or None,
                    metric_type=metric if filtered in ("", "none") else f"{metric}_{filtered}",
                    metric_name=label,
                    metric_value=round(100 * value, 2),
                    source_name=SOURCE_NAME,
                    source_url=SOURCE_URL,
                )
            )
    return found


SAME_MEASURE = ("task_type", "dataset_type", "dataset_name", "dataset_config", "dataset_split", "metric_type")


def merge_results(existing: list | None, new: list) -> list:
    """Existing entries not replaced by a new one for the same dataset and metric (whatever its settings:
    a full run replaces a ``--limit`` one), then the new ones."""

    def same(a, b) -> bool:
        return all(getattr(a, f) == getattr(b, f) for f in SAME_MEASURE) and (
            a.metric_name or a.metric_type
        ) == (b.metric_name or b.metric_type)

    kept = [old for old in existing or [] if not any(same(old, n) for n in new)]
    return kept + new


def eval_results_yaml(records: list[dict]) -> str | None:
    """The ``.eval_results`` entries (one headline metric per task) for benchmarks that are Hub datasets."""
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    entries = []
    for record in records:
        dataset = _dataset_path(record)
        spec = record["task"]
        metrics = metric_labels(record)
        if not dataset or not metrics:
            continue
        key, label = next(iter(metrics.items()))
        value = metric_value(record["lm_eval"], spec["task"], key)
        limit = record["settings"].get("limit")
        limited = f", limited to {limit} examples (--limit), not comparable to full runs" if limit else ""
        if value is not None:
            entries.append(
                EvalResultEntry(
                    dataset_id=dataset,
                    task_id=spec["task"],
                    value=round(100 * value, 2),
                    source_url=SOURCE_URL,
                    source_name=SOURCE_NAME,
                    notes=f"{label}, {shots(record['settings']['num_fewshot'])}, "
                    f"lm-eval {record['settings']['lm_eval_version']}{limited}",
                )
            )
    return yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False) if entries else None


def is_derived(card_data: dict) -> bool:
    """A model made from others by hf-residual or a merge: its own skill is not what the suites measure."""
    return card_data.get("base_model_relation") == "merge" or "hf-residual" in (card_data.get("tags") or [])


def section(records: list[dict], table_md: str, card_data: dict, skill_tasks: list[str]) -> tuple[str, bool]:
    """The body section between the markers; True when it says the model's own skill was not measured."""
    settings = records[0]["settings"]
    tasks = ", ".join(f"{r['task']['task']} ({shots(r['settings']['num_fewshot'])})" for r in records)
    lines = [
        START,
        "## Evaluation",
        "",
        f"Measured with [lm-evaluation-harness]({SOURCE_URL}) {settings['lm_eval_version']} by `hf-residual eval` "
        f"(model sha `{records[0]['model']['sha'][:12]}`; tasks: {tasks}; "
        f"chat template {'applied' if settings['apply_chat_template'] else 'not applied'}"
        + _limited(records)
        + "). Scores in %, best of each row in **bold**.",
        *_punkt_lines(records),
        "",
        table_md.rstrip(),
        "",
    ]
    measured_skill = sorted({r["task"]["task"] for r in records} & set(skill_tasks))
    not_measured = is_derived(card_data) and not measured_skill
    if not_measured:
        parents = card_data.get("base_model") or []
        target = parents[0] if isinstance(parents, list) and parents else (parents or "the target model")
        lines += [
            f"**Not measured:** this model is {target} with an instruction residual added. The evaluations above "
            "measure instruction following and general knowledge only; the skill the target was trained for (its "
            "domain or task) was not evaluated, so do not assume it survived. Evaluate it "
            "(`hf-residual eval MODEL --tasks YOUR_TASK`) and re-run `hf-residual card` with `--skill-tasks YOUR_TASK`.",
            "",
        ]
    elif measured_skill:
        lines += [f"The model's own skill was measured by: {', '.join(measured_skill)}.", ""]
    lines.append(END)
    return "\n".join(lines), not_measured


def _limited(records: list[dict]) -> str:
    """The clause saying which results were computed with ``--limit`` ("" when none was)."""
    limited = [r for r in records if r["settings"].get("limit") is not None]
    if not limited:
        return ""
    limits = " or ".join(str(n) for n in sorted({r["settings"]["limit"] for r in limited}))
    which = "" if len(limited) == len(records) else f" ({', '.join(r['task']['task'] for r in limited)})"
    return f"; **limited to {limits} examples per task**{which}, not comparable to full runs"


def _punkt_lines(records: list[dict]) -> list[str]:
    """Which punkt split sentences for the IFEval scorer, per task that used one."""
    from hf_residual.evaluation.punkt import describe

    used: dict[str, list[str]] = {}
    for record in records:
        if record["settings"].get("punkt"):
            used.setdefault(record["settings"]["punkt"], []).append(record["task"]["task"])
    if not used:
        return []
    return [
        "",
        *(
            f"IFEval's scorer split sentences with {describe(p)} (tasks: {', '.join(t)})."
            for p, t in used.items()
        ),
    ]


def replace_section(body: str, new: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(body):
        return pattern.sub(lambda _: new, body, count=1)
    return body.rstrip() + "\n\n" + new + "\n"


def update_card(
    card_text: str, model_name: str, records: list[dict], table_md: str, skill_tasks: list[str] = ()
) -> tuple[str, bool, list]:
    """The card with merged model-index and a replaced evaluation section; the rest is kept as it was."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text, ignore_metadata_errors=True)
    new = eval_results(records, model_name)
    card.data.eval_results = merge_results(card.data.eval_results, new)
    card.data.model_name = card.data.model_name or model_name
    body, not_measured = section(records, table_md, card.data.to_dict(), list(skill_tasks))
    card.text = replace_section(card.text, body)
    return str(card), not_measured, new


def load_card_text(ref: str, token: str | None = None) -> tuple[str, Path | None]:
    """The current card of a local folder (its README.md) or of a Hub repo; empty when it has none."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        readme = folder / "README.md"
        return (readme.read_text(encoding="utf-8") if readme.is_file() else ""), folder
    from huggingface_hub import HfApi, hf_hub_download

    from hf_residual.hub.download import hub_errors

    with hub_errors(ref, None, "model", token=token):
        # Listing first: some mirrors answer a missing file as a missing repo.
        if "README.md" not in HfApi(token=token).list_repo_files(ref):
            return "", None
        path = hf_hub_download(ref, "README.md", token=token)
    return Path(path).read_text(encoding="utf-8"), None


def write_card(
    ref: str,
    results_dirs: list[str | Path],
    *,
    output: str | Path | None = None,
    push: bool = False,
    create_pr: bool = False,
    skill_tasks: list[str] = (),
    token: str | None = None,
) -> CardUpdate:
    """Update ``ref``'s card with its results: in place for a local folder, to ``output``, and/or pushed."""
    if push and Path(ref).expanduser().is_dir():
        raise ConfigError(
            f"--push: {ref} is a local folder; give the Hub repo id (org/name) to push its card"
        )
    records = model_records(results_dirs, ref)
    table_md = to_markdown(build_table(results_dirs))
    text, folder = load_card_text(ref, token)
    name = records[0]["model"].get("repo_id") or records[0]["model"]["label"]
    new_text, not_measured, entries = update_card(text, name, records, table_md, skill_tasks)
    extra = eval_results_yaml(records)
    update = CardUpdate(new_text, extra, records[0]["model"]["label"], entries, not_measured=not_measured)
    target = Path(output) if output else (folder if folder is not None else None)
    if target is None and not push:
        target = Path(results_dirs[0]) / "card"
    if target is not None:
        update.written = _write_local(target, new_text, extra)
    if push:
        update.commit_url, update.pr_url = _push(ref, new_text, extra, create_pr, token)
    return update


def _write_local(folder: Path, text: str, extra: str | None) -> list[Path]:
    written = []
    files = {"README.md": text, **({EVAL_RESULTS_FILE: extra} if extra else {})}
    for name, content in files.items():
        path = folder / name
        write_atomic(path, content)
        written.append(path)
    return written


def _push(repo_id: str, text: str, extra: str | None, create_pr: bool, token: str | None):
    from huggingface_hub import CommitOperationAdd, HfApi

    from hf_residual.hub.publish import check_repo_id, upload_errors

    check_repo_id(repo_id)
    operations = [CommitOperationAdd("README.md", text.encode())]
    if extra:
        operations.append(CommitOperationAdd(EVAL_RESULTS_FILE, extra.encode()))
    with upload_errors(repo_id):
        info = HfApi(token=token).create_commit(
            repo_id, operations, commit_message="Add evaluation results with hf-residual", create_pr=create_pr
        )
    return info.commit_url, info.pr_url
