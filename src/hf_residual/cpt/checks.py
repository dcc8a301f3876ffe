"""Verifiable instruction checks (IFEval-style): an instruction appended to a prompt and a function that
decides from the reply's form alone whether it was followed. Used to score instruction drift live.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from hf_residual.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """One verifiable instruction: the text added to the prompt and the test of the reply."""

    name: str
    instruction: str
    passes: Callable[[str], bool]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _is_json(text: str) -> bool:
    stripped = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(stripped)
    except ValueError:
        return False
    return stripped.startswith(("{", "["))


def _has_letters(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]", text))


CHECKS: dict[str, Check] = {
    check.name: check
    for check in [
        Check("upper", "Answer in capital letters only.", lambda t: _has_letters(t) and t == t.upper()),
        Check("lower", "Use no capital letters.", lambda t: _has_letters(t) and t == t.lower()),
        Check("words3", "Answer in exactly three words.", lambda t: len(_words(t)) == 3),
        Check("max10", "Answer in at most ten words.", lambda t: 0 < len(_words(t)) <= 10),
        Check("keyword", "Use the word 'indeed' in your reply.", lambda t: "indeed" in t.lower()),
        Check(
            "brackets",
            "Wrap your whole answer in square brackets.",
            lambda t: t.strip().startswith("[") and t.strip().endswith("]"),
        ),
        Check("json", "Reply with a JSON object only.", _is_json),
        Check("prefix", "Start your reply with 'Answer:'.", lambda t: t.strip().startswith("Answer:")),
    ]
}

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "What do bees make?",
    "Which animal says moo?",
]


def resolve_checks(names: list[str] | None) -> list[Check]:
    """The named checks (all when None); unknown names are a ConfigError listing the known ones."""
    if names is None:
        return list(CHECKS.values())
    unknown = [name for name in names if name not in CHECKS]
    if unknown or not names:
        raise ConfigError(f"unknown instruction checks {unknown or names}; choose from {', '.join(CHECKS)}")
    return [CHECKS[name] for name in names]


def score(replies: dict[tuple[str, str], str], checks: list[Check]) -> dict[str, float]:
    """Share of replies passing, overall and per check; ``replies`` maps (prompt, check name) -> text."""
    by_name = {check.name: check for check in checks}
    passed: dict[str, list[bool]] = {name: [] for name in by_name}
    for (_, name), text in replies.items():
        passed[name].append(by_name[name].passes(text))
    flat = [ok for oks in passed.values() for ok in oks]
    result = {"all": sum(flat) / len(flat) if flat else 0.0}
    result.update({name: sum(oks) / len(oks) for name, oks in passed.items() if oks})
    return result
