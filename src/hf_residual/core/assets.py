"""Non-weight files: tokenizer, chat template, generation config, and the output's config.json.

The ported model speaks like the instruct model, so it takes the instruct side's tokenizer files, chat
template and generation config (eos ids included); its architecture config is the target's, with the
vocabulary size of the instruct side when instruct added tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hf_residual.core.output import write_atomic

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FOLDERS = ("additional_chat_templates",)
GENERATION_CONFIG = "generation_config.json"
INSTRUCT_CONFIG = "instruct_config.json"
# Fields of config.json that belong to the tokenizer side, taken from the instruct model.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_chat_assets(source: Path, destination: Path) -> list[str]:
    """Copy tokenizer files, chat templates and generation config that exist in ``source``."""
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    for name in TOKENIZER_FOLDERS:
        if (source / name).is_dir():
            shutil.copytree(source / name, destination / name)
            copied.append(name + "/")
    return copied


def output_config(target_config: dict, instruct_config: dict, vocab_size: int | None) -> dict:
    """The target's config with the instruct side's token ids and (grown) vocabulary size."""
    config = json.loads(json.dumps(target_config))
    text = config.get("text_config", config)
    for field in TOKEN_ID_FIELDS:
        value = instruct_config.get("text_config", instruct_config).get(field)
        if value is not None:
            text[field] = value
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return config


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- chat templates: the one place that decides whether a tokenizer or folder has one -----------------


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer files of ``folder`` carry a chat template (a file, or tokenizer_config's)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def prompt_text(tokenizer, content: str, plain_suffix: str = "") -> tuple[str, bool]:
    """The text to tokenize for one user turn, and whether the tokenizer should add special tokens.

    With a chat template: the templated conversation with the generation prompt (its special tokens are
    in the text). Without one: ``content + plain_suffix`` as plain text.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return text, False
    return content + plain_suffix, True
