"""Evaluation: instruction following (greedy replies checked by code) and knowledge (exact completion).

Every model is asked the same chat prompts with the instruct model's chat template, as the paper runs
IFEval on base models too; knowledge is plain-text completion (``"X lives in"`` -> ``" Amsel"``), counted
right only when every token of the value is the model's top choice. The probe follows a generic sentence,
as most statements do in the corpora: a name's first token differs with and without a leading space.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hf_residual.demo import cache, instructions, training
from hf_residual.demo.world import ChatItem, Fact, World

# Part of the cached scores' key: bump when scoring changes.
VERSION = "5"  # 4, 5: one verifier (hf_residual.evaluation.verifiers, IFEval checkers)

# Context before each knowledge probe, so the entity name is tokenized as it mostly is in training text.
PROBE_CONTEXT = "The bridge stands by the hill."


@dataclass
class IFScore:
    strict: float
    loose: float
    samples: list[dict]


def generate_replies(
    model, tokenizer, items: list[ChatItem], max_new_tokens: int, batch_size: int = 128
) -> list[tuple[str, bool]]:
    """Greedy replies to each item's chat prompt, and whether each ended its turn within the limit."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    stops = {tokenizer.eos_token_id, end}
    replies = []
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            texts = [
                tokenizer.apply_chat_template(it.messages(), add_generation_prompt=True, tokenize=False)
                for it in chunk
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(stops),
                    pad_token_id=tokenizer.pad_token_id,
                )
            for row in out[:, enc["input_ids"].shape[1] :]:
                finished = any(int(t) in stops for t in row)
                replies.append((tokenizer.decode(row, skip_special_tokens=True), finished))
    finally:
        tokenizer.padding_side = "right"
    return replies


def instruction_following(model, tokenizer, items: list[ChatItem], max_new_tokens: int) -> IFScore:
    """Share of prompts whose reply follows the format instruction.

    Strict: the reply ends its turn (a reply cut off at the token limit rambled on) and follows the
    format's rules as written (IFEval strict). Loose: IFEval loose on the text, ended or not.
    """
    replies = generate_replies(model, tokenizer, items, max_new_tokens)
    verdicts = [instructions.verdict(it.fmt, r) for it, (r, _) in zip(items, replies, strict=True)]
    strict = [done and v["prompt_level_strict_acc"] for v, (_, done) in zip(verdicts, replies, strict=True)]
    loose = [v["prompt_level_loose_acc"] for v in verdicts]
    samples = [
        {"prompt": it.messages()[0]["content"], "reply": r, "ended": done, "format": it.fmt, "strict": s}
        for it, (r, done), s in zip(items, replies, strict, strict=True)
    ]
    return IFScore(sum(strict) / len(items), sum(loose) / len(items), samples)


def knowledge(model, tokenizer, facts: list[Fact], batch_size: int = 128) -> float:
    """Share of facts whose value the model completes exactly (teacher-forced argmax on every token)."""
    import torch

    correct = 0
    for i in range(0, len(facts), batch_size):
        chunk = facts[i : i + batch_size]
        rows, spans = [], []
        for fact in chunk:
            prefix, value = fact.probe()
            text = f"{PROBE_CONTEXT} {prefix}"
            p = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            v = tokenizer(value, add_special_tokens=False)["input_ids"]
            rows.append(p + v)
            spans.append((len(p), len(v)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.no_grad():
            predicted = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)
        for j, (start, length) in enumerate(spans):
            target = ids[j, start : start + length]
            guess = predicted[j, start - 1 : start - 1 + length]
            correct += bool(torch.equal(target, guess))
    return correct / len(facts)


def model_scores(path: Path, tok, w: World, max_new_tokens: int, eval_key: str) -> dict:
    """Scores of one model folder, cached beside it under the evaluation's key."""
    stamp = path / "demo-eval.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == eval_key and saved.get("stage") == cache.read_info(path).get("key"):
            return saved["scores"]
    model = training.load_model(path)
    if_a = instruction_following(model, tok, w.eval_a, max_new_tokens)
    if_b = instruction_following(model, tok, w.eval_b, max_new_tokens)
    scores = {
        "if_a_strict": if_a.strict,
        "if_b_strict": if_b.strict,
        "if_strict": (if_a.strict + if_b.strict) / 2,
        "if_loose": (if_a.loose + if_b.loose) / 2,
        "know_a": knowledge(model, tok, w.a_facts),
        "know_b": knowledge(model, tok, w.b_facts),
        "samples": (if_a.samples[:4] + if_b.samples[:4]),
    }
    stage_key = cache.read_info(path).get("key")
    stamp.write_text(json.dumps({"key": eval_key, "stage": stage_key, "scores": scores}, indent=2) + "\n")
    return scores


def scores_by_weights(paths: dict[str, Path], score: Callable[[Path], dict]) -> dict[str, dict]:
    """``score(path)`` per model, once per set of weights: folders with identical weights, config and
    tokenizer (the tuned rows when tune keeps the plain port) share one evaluation instead of repeating it."""
    from hf_residual.evaluation.runner import folder_sha

    scores: dict[str, dict] = {}
    first: dict[str, str] = {}
    for name, path in paths.items():
        sha = folder_sha(path)
        scores[name] = scores[first[sha]] if sha in first else score(path)
        first.setdefault(sha, name)
    return scores
