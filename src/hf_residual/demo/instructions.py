"""Format instructions whose compliance code can verify (IFEval-style), strict and loose.

Each format has a few instruction wordings (``variant``), a canonical response built from the plain
answer sentence, and rules judged by ``hf_residual.evaluation.verifiers``, the verifier of the offline-if
suite and of the CPT drift callback (IFEval's checkers where one applies). Checks look at the form only,
not at whether the fact is right: knowledge is measured separately.
"""

from __future__ import annotations

import json

from hf_residual.evaluation import verifiers

KEYWORDS = ["indeed", "clearly", "surely"]
END_PHRASES = ["Hope that helps.", "That is all."]
WORD_COUNTS = [1, 2, 3]

_INSTRUCTIONS = {
    "upper": ["Answer in capital letters only.", "Write your answer all in upper case."],
    "lower": ["Answer in lower case only.", "Use no capital letters."],
    "brackets": ["Wrap your answer in square brackets.", "Put your whole answer inside [ and ]."],
    "quotes": ["Wrap your answer in double quotes.", "Put your whole answer in quotation marks."],
    "twice": ["Say your answer twice.", "Repeat your answer two times."],
    "json": ["Reply in JSON.", "Give the answer as a JSON object."],
    "prefix": ["Start your reply with 'Answer:'.", "Begin with the word 'Answer:'."],
    "bullet": ["Answer as a bullet point.", "Reply as a list item starting with a dash."],
    **{f"keyword{i}": [f"Use the word '{k}' in your reply."] for i, k in enumerate(KEYWORDS)},
    **{f"end{i}": [f"End your reply with '{p}'"] for i, p in enumerate(END_PHRASES)},
    **{f"words{n}": [f"Answer in exactly {n} word{'s' if n > 1 else ''}."] for n in WORD_COUNTS},
}

FORMATS = list(_INSTRUCTIONS)


def variants(fmt: str) -> int:
    return len(_INSTRUCTIONS[fmt])


def instruction(fmt: str, variant: int) -> str:
    return _INSTRUCTIONS[fmt][variant]


def response(fmt: str, variant: int, sentence: str, value: str) -> str:
    """The canonical compliant reply to a question whose plain answer is ``sentence``."""
    if fmt == "upper":
        return sentence.upper()
    if fmt == "lower":
        return sentence.lower()
    if fmt == "brackets":
        return f"[{sentence}]"
    if fmt == "quotes":
        return f'"{sentence}"'
    if fmt == "twice":
        return f"{sentence} {sentence}"
    if fmt == "json":
        return json.dumps({"answer": value})
    if fmt == "prefix":
        return f"Answer: {sentence}"
    if fmt == "bullet":
        return f"- {sentence}"
    if fmt.startswith("keyword"):
        word = KEYWORDS[int(fmt[7:])]
        return f"{word.capitalize()}, {sentence[0].lower()}{sentence[1:]}"
    if fmt.startswith("end"):
        return f"{sentence} {END_PHRASES[int(fmt[3:])]}"
    if fmt.startswith("words"):
        n = int(fmt[5:])
        return " ".join(([value] + ["for", "sure"])[:n])
    raise KeyError(fmt)


RULES: dict[str, tuple[dict, ...]] = {
    "upper": ({"id": "uppercase"},),
    "lower": ({"id": "lowercase"},),
    "brackets": ({"id": "wrap_in_brackets"},),
    "quotes": ({"id": "wrap_in_quotes"},),
    "twice": ({"id": "repeat_twice"},),
    "json": ({"id": "json"},),
    "prefix": ({"id": "start_with", "phrase": "Answer:"},),
    "bullet": ({"id": "bullet_points", "n": 1},),
    **{f"keyword{i}": ({"id": "include_keyword", "word": k},) for i, k in enumerate(KEYWORDS)},
    **{f"end{i}": ({"id": "end_with", "phrase": p},) for i, p in enumerate(END_PHRASES)},
    **{f"words{n}": ({"id": "min_words", "n": n}, {"id": "max_words", "n": n}) for n in WORD_COUNTS},
}
"""Each format's instructions for ``hf_residual.evaluation.verifiers`` (the offline-if suite's verifier)."""


def verdict(fmt: str, text: str) -> dict[str, object]:
    """IFEval's four results for ``text`` under ``fmt``'s rules (``verifiers.score``)."""
    return verifiers.score(list(RULES[fmt]), text)


def check(fmt: str, text: str) -> bool:
    """Strict: does ``text`` follow the format instruction as written (every rule, IFEval strict)?"""
    return bool(verdict(fmt, text)["prompt_level_strict_acc"])


def check_loose(fmt: str, text: str) -> bool:
    """Loose (IFEval): every rule holds on some cleaned variant of ``text`` (no ``*``, no first/last line)."""
    return bool(verdict(fmt, text)["prompt_level_loose_acc"])
