"""Training on CPU with a plain torch loop: pre-training, SFT (loss on assistant tokens only) and CPT.

One loop serves all three; what differs is the batches (packed plain text, or padded chats with
prompt tokens masked out of the loss) and the learning-rate schedule (warm-up, then constant or
cosine decay: CPT's "re-warming and re-decaying" of Ibrahim et al. 2024).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 256


@dataclass(frozen=True)
class Schedule:
    """Learning rate: linear warm-up for ``warmup`` steps, then constant or ``cosine`` to ``min_ratio``."""

    lr: float
    warmup: int
    decay: str = "cosine"
    min_ratio: float = 0.1

    def at(self, step: int, total: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, total - self.warmup)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def new_model(shape: ModelShape, tokenizer, seed: int):
    """A randomly initialised ``LlamaForCausalLM`` sized by ``shape``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_documents(tokenizer, docs: list[str]) -> list[int]:
    """Documents as one token stream: ``<bos> doc <end_of_text>`` each."""
    stream: list[int] = []
    end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, end]
    return stream


def packed_rows(stream: list[int], seq_len: int):
    """Cut a token stream into full rows of ``seq_len`` (documents may span rows, as in packing)."""
    import torch

    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chat_example(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels, with every token but the assistant's reply masked out."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    answer = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt) + answer, [IGNORE] * len(prompt) + answer


def chat_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, epochs: int, seed: int):
    """Right-padded batches of chat examples, reshuffled every epoch.

    No attention mask: with right padding and a causal model, pads never affect real tokens, their
    labels are ignored, and the unmasked path is about three times faster on CPU.
    """
    import torch

    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [examples[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
            batches.append({"input_ids": ids, "labels": labels})
    return batches


def with_replay(
    batches: list[dict], rows, per_batch: int, seed: int, *, balanced: bool = False
) -> list[dict]:
    """Each batch with ``per_batch`` random packed plain-text rows added (all their tokens in the loss).

    Mixing pre-training text into SFT keeps the plain-text path of the model close to the base's, so the
    instruction residual disturbs knowledge completion less. ``balanced``: the rows become a second part of
    the batch (``{"parts": [batch, rows]}``) and ``train`` adds the two parts' mean losses, so a few answer
    tokens weigh as much as the replayed text instead of drowning in it (DocChat: 8 rows of 64 tokens
    against 32 answers of 2-3 tokens); the same skill then takes half the steps (docs/DEMO.md).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        extra = rows[torch.randint(len(rows), (per_batch,), generator=gen)]
        if balanced:
            out.append({"parts": [batch, {"input_ids": extra, "labels": extra}]})
            continue
        ids, labels = batch["input_ids"], batch["labels"]
        width = max(ids.shape[1], extra.shape[1])
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=0)
        labels = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=IGNORE)
        extra_labels = torch.nn.functional.pad(extra, (0, width - extra.shape[1]), value=IGNORE)
        extra = torch.nn.functional.pad(extra, (0, width - extra.shape[1]), value=0)
        out.append({"input_ids": torch.cat([ids, extra]), "labels": torch.cat([labels, extra_labels])})
    return out


def row_batches(rows, batch_size: int, epochs: int, seed: int):
    """Batches of packed rows (labels = inputs), reshuffled every epoch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = rows[order[i : i + batch_size]]
            batches.append({"input_ids": chunk, "labels": chunk})
    return batches


def train(
    model,
    batches: list[dict],
    schedule: Schedule,
    *,
    weight_decay: float = 0.0,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW over ``batches`` in order; ``on_step(n)`` is called after the n-th step (1-based).

    A batch ``{"parts": [...]}`` (``with_replay(balanced=True)``) is trained on the sum of its parts' mean
    losses."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    losses = []
    total = len(batches)
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(step, total)
        if "parts" in batch:
            loss = sum(model(**part, use_cache=False).loss for part in batch["parts"])
        else:
            loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses


def save_model(model, tokenizer, path: Path, *, chat: bool) -> None:
    """An ordinary transformers folder: safetensors weights, config, tokenizer, generation config."""
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    template = tokenizer.chat_template
    if not chat:
        tokenizer.chat_template = None
    try:
        tokenizer.save_pretrained(path)
    finally:
        tokenizer.chat_template = template
    end = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end] if chat else end,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(path)


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model.eval()
    return model
