"""Verifiable instruction checks (IFEval-style): an instruction appended to a prompt and the rules that
decide from the reply's form alone whether it was followed. Used to score instruction drift live.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_residual.core.assets import prompt_text
from hf_residual.errors import ConfigError
from hf_residual.evaluation import verifiers


@dataclass(frozen=True)
class Check:
    """One verifiable instruction: the text added to the prompt and the rules the reply must obey.

    The rules are judged by ``hf_residual.evaluation.verifiers`` (IFEval's checkers where one applies),
    the verifier of the ``offline-if`` suite and of the demo, so drift logged during training, the demo and
    the evaluation afterwards judge a reply the same way.
    """

    name: str
    instruction: str
    rules: tuple[dict, ...]

    def passes(self, reply: str) -> bool:
        return bool(verifiers.score(list(self.rules), reply)["prompt_level_strict_acc"])


CHECKS: dict[str, Check] = {
    check.name: check
    for check in [
        Check("upper", "Answer in capital letters only.", ({"id": "uppercase"},)),
        Check("lower", "Use no capital letters.", ({"id": "lowercase"},)),
        Check(
            "words3",
            "Answer in exactly three words.",
            ({"id": "min_words", "n": 3}, {"id": "max_words", "n": 3}),
        ),
        Check("max10", "Answer in at most ten words.", ({"id": "max_words", "n": 10},)),
        Check(
            "keyword", "Use the word 'indeed' in your reply.", ({"id": "include_keyword", "word": "indeed"},)
        ),
        Check("brackets", "Wrap your whole answer in square brackets.", ({"id": "wrap_in_brackets"},)),
        Check("json", "Reply in JSON format only.", ({"id": "json"},)),
        Check("prefix", "Start your reply with 'Answer:'.", ({"id": "start_with", "phrase": "Answer:"},)),
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


def _prompt_ids(tokenizer, prompt: str, instruction: str):
    text, special = prompt_text(tokenizer, f"{prompt} {instruction}", plain_suffix="\n")
    return tokenizer(text, add_special_tokens=special, return_tensors="pt")


def generate_replies(model, tokenizer, prompts: list[str], checks, max_new_tokens: int) -> dict:
    """Greedy replies to every (prompt, check) pair, one at a time (no padding questions)."""
    import torch

    was_training = model.training
    model.eval()
    replies = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for prompt in prompts:
                for check in checks:
                    inputs = _prompt_ids(tokenizer, prompt, check.instruction).to(model.device)
                    out = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=pad,
                    )
                    new = out[0, inputs["input_ids"].shape[1] :]
                    replies[(prompt, check.name)] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return replies
