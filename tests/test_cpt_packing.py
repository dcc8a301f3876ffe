"""Packing with per-document attention: each document's logits packed must equal its logits alone."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import trl  # noqa: F401  (the [cpt] extra: a broken install must fail here, not skip)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_residual.cpt.packing import pack_documents, packing_collator, prepare_model, tokenize_documents
from hf_residual.errors import ConfigError

WORDS = [
    "the",
    "river",
    "city",
    "council",
    "voted",
    "new",
    "bridge",
    "budget",
    "tax",
    "school",
    "rain",
    "storm",
    "market",
    "price",
    "quick",
    "fox",
]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def f32(families):
    return families("llama", "float32")


@pytest.fixture(scope="module")
def packed(f32):
    tokenizer = AutoTokenizer.from_pretrained(f32.base)
    tokenized = tokenize_documents(Dataset.from_dict({"text": documents(12)}), tokenizer)
    return tokenizer, tokenized, pack_documents(tokenized, seq_len=96)


def test_packing_keeps_every_token_and_fills_rows(packed):
    _, tokenized, rows = packed
    assert sum(len(r) for r in rows["input_ids"]) == sum(len(r) for r in tokenized["input_ids"])
    assert all(len(r) <= 96 for r in rows["input_ids"])
    assert len(rows) < len(tokenized)
    assert max(len(lengths) for lengths in rows["seq_lengths"]) >= 2


def _segments(batch) -> list[tuple[int, int]]:
    """Each document's [start, end) in the flattened row: where ``position_ids`` restart at 0.

    (trl >= 1.16 also returns these bounds as ``cu_seq_lens_q``, computed the same way; older trl does not.)
    """
    positions = batch["position_ids"][0]
    bounds = [*(positions == 0).nonzero().flatten().tolist(), positions.numel()]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def _documents(examples) -> list[tuple[int, int]]:
    """Each document's [start, end) once ``examples`` are flattened, from the packer's ``seq_lengths``."""
    lengths = [n for example in examples for n in example["seq_lengths"]]
    bounds = [0, *itertools.accumulate(lengths)]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def _max_gap(model, batch, **overrides) -> list[float]:
    """Per document: max |logits packed - logits alone|."""
    with torch.no_grad():
        packed_logits = model(**batch, **overrides).logits[0]
        gaps = []
        for start, end in _segments(batch):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            gaps.append((packed_logits[start:end] - alone).abs().max().item())
    return gaps


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_each_document_attends_only_to_itself(f32, packed, attention):
    tokenizer, _, rows = packed
    model = AutoModelForCausalLM.from_pretrained(f32.base, attn_implementation=attention, dtype=torch.float32)
    prepare_model(model).train()  # the configuration training uses: train mode, no cache, no mask
    examples = [rows[i] for i in range(min(3, len(rows)))]
    batch = packing_collator(tokenizer)(examples)
    assert "attention_mask" not in batch
    assert _segments(batch) == _documents(examples)  # position_ids restart exactly at each document
    assert len(_segments(batch)) >= 3
    gaps = _max_gap(model, batch)
    assert max(gaps) < 1e-4, gaps
    # The test has teeth: the same rows with the cache on (the model's default) or with a plain mask leak.
    assert max(_max_gap(model, batch, use_cache=True)[1:]) > 1e-3
    mask = torch.ones_like(batch["input_ids"])
    assert max(_max_gap(model, batch, attention_mask=mask)[1:]) > 1e-3


def test_labels_never_cross_a_document_boundary(packed):
    tokenizer, _, rows = packed
    batch = packing_collator(tokenizer)([rows[0], rows[1]])
    assert _segments(batch) == _documents([rows[0], rows[1]])  # position_ids restart at each document only
    starts = [start for start, _ in _segments(batch)]
    assert (batch["labels"][0, starts] == -100).all()
    for start, end in _segments(batch):
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))


def test_bad_settings_are_refused(f32, packed):
    _, tokenized, _ = packed
    with pytest.raises(ConfigError, match="packing strategy"):
        pack_documents(tokenized, 64, strategy="wrapped")
    with pytest.raises(ConfigError, match="text_field"):
        tokenize_documents(Dataset.from_dict({"body": ["x"]}), AutoTokenizer.from_pretrained(f32.base))
    model = AutoModelForCausalLM.from_pretrained(f32.base, attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match="flex_attention"):
        prepare_model(model)
