"""``--json``: a command's result as one JSON object on stdout, for scripts and CI; nothing else goes there.

Progress bars, messages and warnings go to stderr as always; the plain-text lines a command prints otherwise
are left out. Values are plain JSON: paths as strings, dataclasses as objects, NaN and infinities as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object on stdout and nothing else there (progress and messages "
        "go to stderr), for scripts and CI",
    )


def plain(value):
    """``value`` made of JSON types only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def emit(data: dict) -> None:
    sys.stdout.write(json.dumps(plain(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def folder_files(folder: Path) -> dict[str, int]:
    """The files written to an output folder (top level, names to sizes in bytes)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def written(command: str, result, seconds: float, **extra) -> dict:
    """The JSON of ``extract``, ``apply`` and ``port``: where the output is, what it holds, what was measured.

    Every entry of the API's ``Result.details`` is included (alpha, distance, base, codec, ...), so what
    the API reports appears here without a CLI change. ``output`` is null when it was a temporary folder
    removed after publishing (``publication`` then lists the uploaded files).
    """
    details = {k: v.absolute() if isinstance(v, Path) else v for k, v in result.details.items()}
    temporary = bool(details.pop("temporary_output", False))
    publication = details.pop("publication", None)
    output = Path(result.output).absolute()
    return {
        "command": command,
        "output": None if temporary else str(output),
        "temporary_output": temporary,
        "tensors": result.tensors,
        "bytes": result.bytes_written,
        "files": {} if temporary else folder_files(output),
        **details,
        **extra,
        "publication": publication,
        "seconds": round(seconds, 3),
    }


def residual_models(folder: Path) -> dict | None:
    """The instruct and base models a residual folder was computed from, as its manifest records them
    (a Hub model with its repo id and pinned commit sha in ``revision``); None when the folder is gone."""
    from hf_residual.core.manifest import is_residual_folder, read_manifest

    if not is_residual_folder(folder):
        return None
    manifest = read_manifest(folder)
    return {"instruct": manifest.instruct, "base": manifest.base}


def summary_json(ref: str, summary) -> dict:
    """One PATH of ``inspect``: the argument, the folder it resolved to and what it holds."""
    manifest = summary.manifest
    residual = None
    if manifest is not None:
        residual = {
            "instruct": manifest.instruct,
            "base": manifest.base,
            "codec": manifest.codec_params.get("spec", manifest.codec),
            "lossless": manifest.lossless,
        }
    repo_id, revision = hub_snapshot(Path(summary.path))
    return {
        "ref": ref,
        "path": Path(summary.path).absolute(),
        "repo_id": repo_id,
        "revision": revision,
        "kind": summary.kind,
        "model_type": summary.model_type,
        "tensors": summary.tensors,
        "bytes": summary.bytes,
        "dtypes": summary.dtypes,
        "residual": residual,
        "layer_norms": {" ".join(k.split()): v for k, v in summary.layer_norms.items()},
    }


def eval_json(run, suite, seconds: float) -> dict:
    """``eval``: the results folder, each model with its sha, each task run (reused or not, its stored file
    and its metrics as lm-eval reported them, fractions) and the folder's table (percent)."""
    from hf_residual.evaluation.table import build_table, metric_labels, metric_value, to_dict

    models = list({r.model.label: r.model for r in run.runs}.values())
    runs = []
    for task_run in run.runs:
        record = {"task": task_run.task.to_dict(), "lm_eval": task_run.results}
        runs.append(
            {
                "model": task_run.model.label,
                "task": task_run.task.task,
                "num_fewshot": task_run.task.num_fewshot,
                "reused": task_run.reused,
                "path": Path(task_run.path).absolute(),
                "metrics": {
                    label: metric_value(task_run.results, task_run.task.task, key)
                    for key, label in metric_labels(record).items()
                },
            }
        )
    reused = sum(r.reused for r in run.runs)
    return {
        "command": "eval",
        "results_dir": Path(run.results_dir).absolute(),
        "suite": suite.name,
        "models": models,
        "runs": runs,
        "run": len(run.runs) - reused,
        "reused": reused,
        "table": to_dict(build_table([run.results_dir])),
        "seconds": round(seconds, 3),
    }


def hub_snapshot(path: Path) -> tuple[str | None, str | None]:
    """(repo id, commit sha) of a folder in the Hugging Face cache (``models--org--name/snapshots/<sha>``,
    where Hub models are resolved to), else (None, None) for a local folder."""
    parts = path.absolute().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    return None, None
