"""Reuse of built models: each stage folder records a key made of the settings that produced it.

A stage is rebuilt when its key changes (a setting, the seed, a parent stage or the demo's version),
so a second ``hf-residual demo`` with the same settings only evaluates and reports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Bump when training or data generation changes in a way that makes old folders wrong.
DEMO_VERSION = 1
STAMP = "demo-stage.json"


def key(stage: str, settings: dict, *parents: str) -> str:
    """A short, stable hash of a stage's name, its settings and its parents' keys."""
    text = json.dumps([DEMO_VERSION, stage, settings, list(parents)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_built(path: Path, stage_key: str) -> bool:
    stamp = path / STAMP
    if not stamp.is_file() or not (path / "config.json").is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == stage_key
    except ValueError:
        return False


def needs_build(path: Path, stage_key: str, rebuild: bool = False) -> bool:
    """True when the stage must be (re)built; then its stale stamp is removed first, so a run cut off
    while rewriting the folder never leaves new weights under an old key."""
    if not rebuild and is_built(path, stage_key):
        return False
    (path / STAMP).unlink(missing_ok=True)
    return True


def mark_built(path: Path, stage_key: str, info: dict) -> None:
    (path / STAMP).write_text(json.dumps({"key": stage_key, **info}, indent=2, sort_keys=True) + "\n")


def read_info(path: Path) -> dict:
    return json.loads((path / STAMP).read_text())
