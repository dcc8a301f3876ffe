"""Format instructions whose compliance code can verify (IFEval-style), strict and loose.

Each format has a few instruction wordings (``variant``), a canonical response built from the plain
answer sentence, and a checker. Checks look at the form only, not at whether the fact is right:
knowledge is measured separately.
"""

from __future__ import annotations

import json
import re

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


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check(fmt: str, text: str) -> bool:
    """Strict: does ``text`` follow the format instruction exactly as written?"""
    if not text.strip():
        return False
    has_letters = bool(re.search(r"[A-Za-z]", text))
    if fmt == "upper":
        return has_letters and text == text.upper()
    if fmt == "lower":
        return has_letters and text == text.lower()
    if fmt == "brackets":
        return text.startswith("[") and text.endswith("]") and len(text) > 2
    if fmt == "quotes":
        return text.startswith('"') and text.endswith('"') and len(text) > 2
    if fmt == "twice":
        half, rest = len(text) // 2, len(text) % 2
        return rest == 1 and text[half] == " " and text[:half] == text[half + 1 :] and half > 0
    if fmt == "json":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if fmt == "prefix":
        return text.startswith("Answer:") and len(text) > len("Answer:")
    if fmt == "bullet":
        return text.startswith("- ") and "\n" not in text and len(text) > 2
    if fmt.startswith("keyword"):
        return KEYWORDS[int(fmt[7:])] in [w.lower() for w in _words(text)]
    if fmt.startswith("end"):
        return text.endswith(END_PHRASES[int(fmt[3:])]) and len(text) > len(END_PHRASES[int(fmt[3:])])
    if fmt.startswith("words"):
        return len(_words(text)) == int(fmt[5:])
    raise KeyError(fmt)


def check_loose(fmt: str, text: str) -> bool:
    """Loose (as IFEval): strict on any of a few cleaned variants of ``text``."""
    stripped = text.strip()
    lines = stripped.splitlines()
    candidates = {
        stripped,
        stripped.replace("*", ""),
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
    }
    if fmt.startswith("twice"):
        candidates.add(" ".join(stripped.split()))
    return any(check(fmt, c) for c in candidates if c)
