"""hf-residual's one instruction verifier: used by the ``offline-if`` suite, the demo and the drift callback.

An instruction is a dict such as ``{"id": "max_words", "n": 20}``; ``follows(instruction, response)`` says
whether the response obeys it, ``score(instructions, response)`` gives IFEval's four metrics for a prompt.
Every instruction that means what one of IFEval's does is judged by IFEval's own checker, from lm-eval
(``lm_eval.tasks.ifeval.instructions_registry.INSTRUCTION_DICT``); ``IFEVAL`` maps our ids onto them and
our thresholds onto IFEval's relations ("at most n words" is ``number_words`` "less than" n + 1). The
others are written here, in the same style (see each one). Scoring follows IFEval (Zhou et al. 2023):
an empty response follows nothing; *strict* checks the response as given, *loose* also accepts it once
``*`` or the first and/or last line (a preamble such as "Sure, here it is:") is removed.

Choices recorded (docs/DEMO.md, "One verifier"):

- ``json`` is IFEval's ``detectable_format:json_format``: any JSON value after stripping a markdown fence,
  so ``1820``, ``"Amsel"`` or ``null`` pass; the instructions that use it ask for JSON, not for an object.
- ``uppercase`` / ``lowercase`` are IFEval's case rule (``str.isupper()`` / ``str.islower()``) without
  ``change_case:english_capital``'s language detection: our instructions do not ask for English, and
  langdetect is randomised and calls short replies such as "RED, BLUE AND YELLOW" Turkish.
- ``include_keyword`` ("Use the word 'clearly'") needs the whole word, as IFEval's ``forbidden_words`` does;
  IFEval's ``keywords:existence`` would count "Clearlyod" (a CPT'd model's reply in the demo).
- Sentence counts use lm-eval's punkt tokenizer, offline through ``hf_residual.evaluation.punkt``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

# Our id -> (IFEval's instruction id, how our arguments become its build_description keywords).
IFEVAL: dict[str, tuple[str, Callable[..., dict]]] = {
    "max_words": ("length_constraints:number_words", lambda n: {"num_words": n + 1, "relation": "less than"}),
    "min_words": ("length_constraints:number_words", lambda n: {"num_words": n, "relation": "at least"}),
    "max_sentences": (
        "length_constraints:number_sentences",
        lambda n: {"num_sentences": n + 1, "relation": "less than"},
    ),
    "exclude_word": ("keywords:forbidden_words", lambda word: {"forbidden_words": [word]}),
    "no_commas": ("punctuation:no_comma", lambda: {}),
    "wrap_in_quotes": ("startend:quotation", lambda: {}),
    "end_with": ("startend:end_checker", lambda phrase: {"end_phrase": phrase}),
    "bullet_points": ("detectable_format:number_bullet_lists", lambda n: {"num_bullets": n}),
    "json": ("detectable_format:json_format", lambda: {}),
}


def _uppercase(response: str) -> bool:
    """IFEval's ``change_case:english_capital`` without language detection: ``str.isupper()``."""
    return response.isupper()


def _lowercase(response: str) -> bool:
    """IFEval's ``change_case:english_lowercase`` without language detection: ``str.islower()``."""
    return response.islower()


def _wrap_in_brackets(response: str) -> bool:
    """As IFEval's ``startend:quotation``, with ``[`` and ``]``."""
    value = response.strip()
    return len(value) > 1 and value[0] == "[" and value[-1] == "]"


def _include_keyword(response: str, word: str) -> bool:
    """IFEval's ``keywords:existence`` searches for a keyword anywhere, so "Clearlyod" contains "clearly";
    our instructions ask for *the word*, so it must stand as a word (``\\b``, as IFEval's ``forbidden_words``)."""
    return re.search(rf"\b{re.escape(word)}\b", response, flags=re.IGNORECASE) is not None


def _start_with(response: str, phrase: str) -> bool:
    """The mirror of IFEval's ``startend:end_checker``: stripped, quotes removed, case ignored."""
    return response.strip().strip('"').lower().startswith(phrase.strip().lower())


def _single_line(response: str) -> bool:
    return "\n" not in response.strip()


def _repeat_twice(response: str) -> bool:
    """The same text twice, separated by whitespace (IFEval's ``combination:two_responses`` asks for
    two *different* responses separated by ``******``, another instruction)."""
    return re.fullmatch(r"(\S.*?)\s+\1", response.strip(), re.DOTALL) is not None


OWN: dict[str, Callable[..., bool]] = {
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "wrap_in_brackets": _wrap_in_brackets,
    "include_keyword": _include_keyword,
    "start_with": _start_with,
    "single_line": _single_line,
    "repeat_twice": _repeat_twice,
}


@functools.cache
def _registry() -> dict:
    """lm-eval's IFEval checkers, imported with the packaged punkt so nothing is downloaded."""
    from hf_residual.evaluation.punkt import use_offline_punkt

    use_offline_punkt()  # lm-eval's ifeval package downloads punkt_tab on import when none is found
    try:
        from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as error:
        raise ImportError(
            "checking instructions uses lm-eval's IFEval checkers: pip install 'hf-residual[eval]'"
        ) from error
    return INSTRUCTION_DICT


@functools.cache
def _ifeval_checker(instruction_id: str, arguments: str):
    checker = _registry()[instruction_id](instruction_id)
    checker.build_description(**json.loads(arguments))
    return checker


def _ifeval_check(our_id: str) -> Callable[..., bool]:
    ifeval_id, translate = IFEVAL[our_id]

    def check(response: str, **arguments) -> bool:
        keywords = json.dumps(translate(**arguments), sort_keys=True)
        return bool(_ifeval_checker(ifeval_id, keywords).check_following(response))

    check.__name__ = f"ifeval[{ifeval_id}]"
    return check


CHECKS: dict[str, Callable[..., bool]] = {**{k: _ifeval_check(k) for k in IFEVAL}, **OWN}


def follows(instruction: dict, response: str) -> bool:
    """Whether ``response`` obeys ``instruction`` (``{"id": ..., **arguments}``) as written (IFEval strict)."""
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


def follows_loose(instruction: dict, response: str) -> bool:
    """IFEval loose: ``follows`` on any of ``loose_variants(response)``."""
    return any(follows(instruction, v) for v in loose_variants(response))


def score(instructions: list[dict], response: str) -> dict[str, object]:
    """Per-prompt results with IFEval's metric names (prompt-level bools, instruction-level lists)."""
    strict = [follows(i, response) for i in instructions]
    loose = [follows_loose(i, response) for i in instructions]
    return {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }
