"""pyproject.toml's dependency floors and constraints/floors.txt (the floors the test suite was proved with,
docs/DEPENDENCIES.md) must not drift apart: every dependency has a floor, and each floor is pinned there."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Extras whose floors are not part of the proof (docs/DEPENDENCIES.md says why).
UNPROVED_EXTRAS = {"bench"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra not in UNPROVED_EXTRAS:
            found += [r for r in requirements if not r.startswith("hf-residual[")]
    return found


def _floors() -> dict[str, str]:
    floors = {}
    for requirement in _requirements():
        match = re.fullmatch(
            r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?\s*((?:[<>=!~]=?\s*[\w.*]+\s*,?\s*)*)", requirement.strip()
        )
        assert match, f"unexpected requirement syntax: {requirement!r}"
        name, specifiers = match.groups()
        lower = re.findall(r">=\s*([\w.]+)", specifiers)
        assert len(lower) == 1, f"{requirement!r}: every dependency needs exactly one floor (>=)"
        floors[_name(name)] = lower[0]
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def test_every_floor_is_pinned_in_the_constraints_file_and_nothing_else_is():
    floors, pins = _floors(), _pins()
    assert sorted(floors) == sorted(pins)
    for name, floor in floors.items():
        assert _version(floor) == _version(pins[name]), (
            f"{name}: pyproject >={floor}, constraints =={pins[name]}"
        )


def test_the_docs_table_lists_the_same_floors():
    table = (ROOT / "docs" / "DEPENDENCIES.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z0-9_.-]+)` \| [^|]* \| `?([\w.]+)`? \|", table, re.M))
    assert {_name(k): v for k, v in rows.items()} == _floors()
