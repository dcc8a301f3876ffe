"""Tiny real model families built offline: a trained BPE tokenizer with a chat template and small
transformers models (Llama, Qwen2, Mistral, Gemma) saved as ordinary folders.

Used by the tests, the benchmarks and the README's first command, so that everything runs with
nothing downloaded. ``base`` is a random init; ``instruct`` and ``cpt`` are small perturbations of it,
which is all the engine needs (the ``demo`` command trains a family that really follows instructions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction residuals carry the chat skills of an instruct model to a new base model.",
    "Continual pre-training teaches a model new facts; the residual restores instruction following.",
    "Answer in upper case. Answer in exactly three words. Put the answer in brackets.",
    "The capital of Zorvania is Quellport, founded in the year 1820 by the river Amsel.",
    "Tensors are added in float32 and rounded once to the output dtype.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 { } [ ] ( ) : ; , . ! ? \" '",
]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma")


def build_tokenizer(vocab_size: int = 320, chat_tokens: bool = True):
    """Train a small byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS + (CHAT_TOKENS if chat_tokens else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>" if chat_tokens else "<|end_of_text|>",
        pad_token="<pad>",
    )
    if chat_tokens:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, vocab_size: int, hidden: int, layers: int, tied: bool):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown toy architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "gemma":
        kwargs["head_dim"] = hidden // 4
    return AutoConfig.for_model(arch, **kwargs)


@dataclass(frozen=True)
class ToyFamily:
    """Paths of a built family: ``base``, ``instruct`` (fine-tuned from base) and ``cpt`` (a descendant)."""

    base: Path
    instruct: Path
    cpt: Path


def build_family(
    root: str | Path,
    arch: str = "llama",
    dtype: str = "bfloat16",
    *,
    hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 320,
    tied: bool | None = None,
    max_shard_size: str | None = None,
    extra_instruct_tokens: int = 0,
    seed: int = 0,
) -> ToyFamily:
    """Build base, instruct and CPT'd models of one architecture under ``root``.

    ``extra_instruct_tokens`` > 0 gives the instruct model a larger vocabulary (resized embeddings),
    as when chat tokens are added during instruction tuning.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    root = Path(root)
    torch_dtype = getattr(torch, dtype)
    if tied is None:
        tied = arch in ("qwen2", "gemma")
    tokenizer = build_tokenizer(vocab_size=vocab_size - 8)
    vocab = max(vocab_size, len(tokenizer))
    config = _config(arch, vocab, hidden, layers, tied)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).to(torch_dtype)

    def derived(scale: float, seed_offset: int):
        model = AutoModelForCausalLM.from_config(config).to(torch_dtype)
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(seed + seed_offset)
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=gen) * scale * (param.float().std() + 1e-3)
                param.add_(noise.to(torch_dtype))
        return model

    instruct = derived(0.05, 1)
    cpt = derived(0.03, 2)
    if extra_instruct_tokens:
        instruct.resize_token_embeddings(vocab + extra_instruct_tokens)

    paths = ToyFamily(root / "base", root / "instruct", root / "cpt")
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    for model, path, chat in (
        (base, paths.base, False),
        (instruct, paths.instruct, True),
        (cpt, paths.cpt, False),
    ):
        model.save_pretrained(path, **save_kwargs)
        tok = build_tokenizer(vocab_size=vocab_size - 8, chat_tokens=True)
        if not chat:
            tok.chat_template = None
        tok.save_pretrained(path)
        gen_config = GenerationConfig(
            bos_token_id=1, eos_token_id=[3, 2] if chat else 2, pad_token_id=0, do_sample=False
        )
        gen_config.save_pretrained(path)
    _mark(paths.instruct, {"role": "instruct"})
    return paths


def _mark(path: Path, info: dict) -> None:
    (path / "toy.json").write_text(json.dumps(info))
