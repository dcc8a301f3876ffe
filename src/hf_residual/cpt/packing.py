"""Tokenize documents and pack them into rows of ``seq_len`` where each document attends only to itself.

TRL's ``pack_dataset`` (best-fit decreasing) puts whole documents into rows and records their lengths
(``seq_lengths``); TRL's padding-free collator turns those lengths into ``position_ids`` that restart at 0
for every document and sends no attention mask. transformers then derives a per-document causal mask
from the position ids, but only when the forward pass gets no attention mask and no cache: training
must run with ``model.config.use_cache = False`` (see ``prepare_model``), or documents leak into each
other. ``tests/test_cpt_packing.py`` checks this by comparing each document's logits packed and alone.
"""

from __future__ import annotations

from typing import Any

from hf_residual.errors import ConfigError

STRATEGIES = ("bfd_split", "bfd")
# Attention kernels that honour per-document position ids without a mask (flex has no CPU backward).
ISOLATING_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def tokenize_documents(
    dataset,
    tokenizer,
    text_field: str = "text",
    *,
    add_eos: bool = True,
    num_proc: int | None = None,
):
    """One row of ``input_ids`` per document, ending with EOS so the model learns where documents end."""
    if text_field not in dataset.column_names:
        raise ConfigError(
            f"the corpus has no {text_field!r} column (it has {', '.join(dataset.column_names)}); "
            "set text_field to the column holding the documents' text"
        )
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_field], add_special_tokens=True)["input_ids"]
        if add_eos and eos is not None:
            ids = [row if row and row[-1] == eos else row + [eos] for row in ids]
        return {"input_ids": ids}

    return dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="tokenize",
    ).filter(lambda row: len(row["input_ids"]) > 1, desc="drop empty documents")


def pack_documents(tokenized, seq_len: int, strategy: str = "bfd_split"):
    """Rows of at most ``seq_len`` tokens holding whole documents, with their ``seq_lengths``.

    ``bfd_split`` (default) cuts documents longer than ``seq_len`` into pieces (each piece is then a
    document of its own); ``bfd`` truncates them.
    """
    from trl import pack_dataset

    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown packing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    return pack_dataset(tokenized.select_columns(["input_ids"]), seq_len, strategy=strategy)


def packing_collator(tokenizer):
    """TRL's padding-free collator: flattens a batch into one row with per-document ``position_ids``.

    The first token of every document gets label -100, so no document is trained to predict across a
    boundary.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def prepare_model(model) -> Any:
    """Turn the cache off (else documents leak) and refuse attention kernels that do not isolate them."""
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in ISOLATING_ATTENTION:
        raise ConfigError(
            f"attention implementation {implementation!r} does not keep packed documents apart here; "
            f"use one of {', '.join(ISOLATING_ATTENTION)} (attn_implementation in the config)"
        )
    model.config.use_cache = False
    return model


def row_lengths(packed) -> list[int]:
    """Real tokens per packed row (for padding statistics)."""
    return [sum(lengths) for lengths in packed["seq_lengths"]]
