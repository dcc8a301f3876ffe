"""Verifiable instructions of the ``offline-if`` suite: each checks one format rule on a response.

Written for this project (no punkt, no network): a prompt carries a list of instructions such as
``{"id": "max_words", "n": 20}``; ``follows(instruction, response)`` says whether the response obeys it.
Scoring follows IFEval (Zhou et al. 2023): *strict* checks the response as given, *loose* also accepts it
once markdown emphasis or a first/last line (a preamble such as "Sure, here it is:") is removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)


def _words(text: str) -> int:
    return len(WORD.findall(text))


def _sentences(text: str) -> int:
    """Sentences by final punctuation followed by space (what the offline suite's prompts need)."""
    text = text.strip()
    return len(SENTENCE_END.split(text)) if text else 0


def _json(text: str) -> bool:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


CHECKS: dict[str, Callable[..., bool]] = {
    "uppercase": lambda r: _has_letters(r) and r == r.upper(),
    "lowercase": lambda r: _has_letters(r) and r == r.lower(),
    "max_words": lambda r, n: 0 < _words(r) <= n,
    "min_words": lambda r, n: _words(r) >= n,
    "max_sentences": lambda r, n: 0 < _sentences(r) <= n,
    "include_keyword": lambda r, word: re.search(rf"\b{re.escape(word)}\b", r, re.IGNORECASE) is not None,
    "exclude_word": lambda r, word: re.search(rf"\b{re.escape(word)}\b", r, re.IGNORECASE) is None,
    "no_commas": lambda r: bool(r.strip()) and "," not in r,
    "wrap_in_quotes": lambda r: len(r.strip()) > 1 and r.strip()[0] == r.strip()[-1] == '"',
    "wrap_in_brackets": lambda r: len(r.strip()) > 1 and r.strip()[0] == "[" and r.strip()[-1] == "]",
    "start_with": lambda r, phrase: r.strip().lower().startswith(phrase.lower()),
    "end_with": lambda r, phrase: r.strip().lower().endswith(phrase.lower()),
    "bullet_points": lambda r, n: len(BULLET.findall(r)) == n,
    "json": _json,
    "single_line": lambda r: bool(r.strip()) and "\n" not in r.strip(),
}


def follows(instruction: dict, response: str) -> bool:
    """Whether ``response`` obeys ``instruction`` (``{"id": ..., **arguments}``) as written."""
    arguments = {k: v for k, v in instruction.items() if k != "id"}
    return bool(response.strip()) and CHECKS[instruction["id"]](response, **arguments)


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: without ``*``, without the first and/or last line."""
    lines = response.split("\n")
    cuts = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return [v for cut in cuts for v in (cut, cut.replace("*", ""))]


def score(instructions: list[dict], response: str) -> dict[str, object]:
    """Per-prompt results with IFEval's metric names (prompt-level bools, instruction-level lists)."""
    strict = [follows(i, response) for i in instructions]
    variants = loose_variants(response)
    loose = [any(follows(i, v) for v in variants) for i in instructions]
    return {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }
