"""The demo's tokenizer: byte-level BPE trained with ``tokenizers`` on world A's texts, with a chat template.

Corpus B is not in the tokenizer's training text, as with a real model meeting new names after its
tokenizer was fixed: B's names are split into pieces the tokenizer learned from A.
"""

from __future__ import annotations

from hf_residual.toy import CHAT_TEMPLATE, CHAT_TOKENS, SPECIAL_TOKENS

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<pad>"


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast
