"""Results on disk: lm-eval's own results JSON per model and task, keyed by model sha and task settings.

Layout of a results folder::

    models.json                      models in the order they were evaluated (label, ref, repo id, sha)
    <label>/<task>-<key>.json        one finished run: model, task spec, settings, lm-eval's results

``key`` hashes the model sha with everything that changes the numbers (task, shots, limit, chat template,
lm-eval version, and for IFEval the punkt its scorer splits sentences with), so a re-run finds finished
work and a changed setting runs again. Files are written to a temporary name and renamed, so an
interrupted run never leaves a result that looks finished. A model enters ``models.json`` with its first
saved result: a run that fails before any result leaves the folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from hf_residual.core.output import write_atomic
from hf_residual.errors import ConfigError

FORMAT = "hf-residual-eval"
FORMAT_VERSION = 1
MODELS = "models.json"


@dataclass(frozen=True)
class ModelRef:
    """An evaluated model: its table label (unique in the folder; its files are under a slug of it), the
    argument given, its Hub repo id and its sha."""

    label: str
    ref: str
    sha: str
    repo_id: str | None = None


def result_key(model_sha: str, settings: dict) -> str:
    text = json.dumps({"model_sha": model_sha, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", text).strip("-") or "model"


class ResultsStore:
    """One results folder; several models, several tasks each."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._pending: list[ModelRef] = []  # registered, not yet written: no result saved for them yet

    def models(self) -> list[ModelRef]:
        path = self.root / MODELS
        if not path.is_file():
            return []
        return [ModelRef(**m) for m in json.loads(path.read_text(encoding="utf-8"))]

    def register(self, ref: str, sha: str, repo_id: str | None, name: str) -> ModelRef:
        """The model's entry (labels are unique within the folder). A new model is written to models.json
        by ``save``, with its first result, so registering alone writes nothing."""
        known = [*self.models(), *self._pending]
        for model in known:
            if model.sha == sha and model.ref == ref:
                return model
        labels = {m.label for m in known}
        label, n = name, 2
        while label in labels or _slug(label) in {_slug(x) for x in labels}:
            label, n = f"{name}-{n}", n + 1
        model = ModelRef(label, ref, sha, repo_id)
        self._pending.append(model)
        return model

    def _commit_model(self, model: ModelRef) -> None:
        known = self.models()
        if model in known:
            return
        if model.label in {m.label for m in known}:  # another run took the label meanwhile
            raise ConfigError(
                f"{self.root / MODELS}: label {model.label!r} was taken by another run writing to the same "
                "folder; run again"
            )
        _write_json(self.root / MODELS, [m.__dict__ for m in [*known, model]])
        self._pending = [m for m in self._pending if m != model]

    def path(self, model: ModelRef, task: str, key: str) -> Path:
        return self.root / _slug(model.label) / f"{_slug(task)}-{key}.json"

    def load(self, model: ModelRef, task: str, key: str) -> dict | None:
        path = self.path(model, task, key)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save(self, model: ModelRef, task: str, key: str, record: dict) -> Path:
        self._commit_model(model)
        path = self.path(model, task, key)
        _write_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, **record})
        return path

    def records(self) -> list[dict]:
        """The finished results of the folder in models.json order; for a model and task run with several
        settings (another --limit, shots, lm-eval version), only the one saved last."""
        if not self.root.is_dir():
            raise ConfigError(
                f"{self.root}: no such results folder; run `hf-residual eval ... -o {self.root}`"
            )
        order = {m.label: i for i, m in enumerate(self.models())}
        latest: dict[tuple[str, str], dict] = {}
        for path in sorted(self.root.glob("*/*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == FORMAT:
                latest[(data["model"]["label"], data["task"]["task"])] = data
        found = sorted(latest.values(), key=lambda r: r.get("position", 0))
        return sorted(found, key=lambda r: order.get(r["model"]["label"], len(order)))
