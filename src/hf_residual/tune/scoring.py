"""Score one model folder on ``Probes``: greedy chat replies checked by the verifier, and knowledge.

Generation and the exact-completion check follow the demo's evaluation (``hf_residual.demo.evaluate``) for
any tokenizer: a reply ends its turn at the tokenizer's end tokens (eos, the generation config's, and
special tokens named ``end``), and an answer counts only when every token is the model's top choice.
"""

from __future__ import annotations

from pathlib import Path

from hf_residual.tune.probes import IFPrompt, Probes, QAPair

BATCH = 64


def load(path: str | Path, device: str = "cpu", tokenizer: str | Path | None = None):
    """The model (float32 on CPU, its own dtype on an accelerator) of ``path``, and the tokenizer of
    ``tokenizer`` (default ``path``: a ported folder has the instruct model's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "float32" if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tokenizer or path)


def stop_ids(tokenizer, model) -> list[int]:
    """Token ids that end a reply: eos, the generation config's eos ids, special tokens named ``end``."""
    stops = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(configured if isinstance(configured, list) else [configured])
    for token in tokenizer.all_special_tokens:
        if "end" in token.lower():
            stops.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(s for s in stops if isinstance(s, int))


def replies(model, tokenizer, prompts: tuple[IFPrompt, ...], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy replies through the chat template, and whether each ended its turn within the limit."""
    import torch

    if not getattr(tokenizer, "chat_template", None):
        from hf_residual.errors import ConfigError

        raise ConfigError(
            "the tokenizer has no chat template, so instruction prompts cannot be asked: port from an "
            "instruct model whose tokenizer has one (the ported folder takes the instruct model's tokenizer)"
        )
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[tuple[str, bool]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for i in range(0, len(prompts), BATCH):
            texts = [
                tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
                for p in prompts[i : i + BATCH]
            ]
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token_id = pad
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(
                model.device
            )
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=pad,
                )
            for row in ids[:, enc["input_ids"].shape[1] :].tolist():
                out.append((tokenizer.decode(row, skip_special_tokens=True), any(t in stops for t in row)))
    finally:
        tokenizer.padding_side = side
    return out


def instruction_following(model, tokenizer, probes: Probes) -> tuple[float, float, list[dict]]:
    """Strict share (the reply ended its turn and follows every instruction), loose share, a few samples."""
    from hf_residual.evaluation import verifiers

    answers = replies(model, tokenizer, probes.if_prompts, probes.max_new_tokens)
    strict, loose, samples = 0, 0, []
    for prompt, (text, ended) in zip(probes.if_prompts, answers, strict=True):
        verdict = verifiers.score(list(prompt.instructions), text)
        ok = ended and bool(verdict["prompt_level_strict_acc"])
        strict += ok
        loose += bool(verdict["prompt_level_loose_acc"])
        if len(samples) < 4:
            samples.append({"prompt": prompt.prompt, "reply": text, "ended": ended, "strict": ok})
    n = len(probes.if_prompts)
    return strict / n, loose / n, samples


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids with the tokenizer's special tokens, and bos first when the tokenizer has one."""
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def _padded(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask


def exact_completion(model, tokenizer, pairs: tuple[QAPair, ...]) -> float:
    """Share of pairs whose answer the model completes exactly (teacher-forced argmax on every token)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for i in range(0, len(pairs), BATCH):
        rows, spans = [], []
        for pair in pairs[i : i + BATCH]:
            p = _prompt_ids(tokenizer, pair.prompt)
            v = tokenizer(pair.answer, add_special_tokens=False)["input_ids"]
            rows.append(p + v)
            spans.append((len(p), len(v)))
        ids, mask = _padded(rows, pad)
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False
            )
        predicted = logits.logits.argmax(-1).cpu()
        for j, (start, length) in enumerate(spans):
            correct += bool(
                torch.equal(ids[j, start : start + length], predicted[j, start - 1 : start - 1 + length])
            )
    return correct / len(pairs)


def text_likelihood(model, tokenizer, texts: tuple[str, ...], max_tokens: int) -> float:
    """Mean log-likelihood per predicted token (nats) of the texts, each cut to ``max_tokens`` tokens."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(texts), BATCH):
        rows = [_prompt_ids(tokenizer, t)[:max_tokens] for t in texts[i : i + BATCH]]
        ids, mask = _padded(rows, pad)
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False
            )
        logp = torch.log_softmax(logits.logits.float().cpu()[:, :-1], dim=-1)
        picked = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        total += float(picked.sum())
        count += int(mask[:, 1:].sum())
    return total / max(count, 1)


def score(path: str | Path, probes: Probes, device: str = "cpu", tokenizer: str | Path | None = None) -> dict:
    """Both probes on the model folder ``path``: ``if`` (strict), ``if_loose``, ``knowledge``, samples."""
    model, tokenizer = load(path, device, tokenizer)
    strict, loose, samples = instruction_following(model, tokenizer, probes)
    if probes.qa:
        know = exact_completion(model, tokenizer, probes.qa)
    else:
        know = text_likelihood(model, tokenizer, probes.texts, probes.max_text_tokens)
    return {"if": strict, "if_loose": loose, "knowledge": know, "samples": samples}
