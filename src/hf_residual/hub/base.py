"""Find the base of an instruct model: its card's ``base_model``, else the packaged table of known pairs.

``--base`` always wins; this is only consulted when no base was given. The table is data
(``hf_residual/data/known_pairs.json``), so adding a family is a one-line edit, not code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from hf_residual.errors import ConfigError

# Relations under which a card's base_model is not the model the weights were fine-tuned from.
_NOT_A_FINETUNE = {"merge", "adapter", "quantized"}


@dataclass(frozen=True)
class BaseChoice:
    """The base found, and where it came from (for the user to see)."""

    ref: str
    source: str


def read_card_data(folder: Path) -> dict:
    """The YAML front matter of ``folder/README.md`` ({} when there is none or it does not parse)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("---"):
        return {}
    parts = text.lstrip().split("---", 2)
    if len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


@cache
def known_pairs() -> dict[str, str]:
    """Instruct repo id (lower case) -> base repo id, from the packaged table."""
    text = resources.files("hf_residual").joinpath("data/known_pairs.json").read_text(encoding="utf-8")
    return {p["instruct"].lower(): p["base"] for p in json.loads(text)["pairs"]}


def base_from_card(card: dict, own_id: str | None) -> str | None:
    """A single ``base_model`` on a fine-tune's card; None when absent, ambiguous or not a fine-tune."""
    if card.get("base_model_relation") in _NOT_A_FINETUNE:
        return None
    base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    if not isinstance(base, str) or not base.strip() or base == own_id:
        return None
    return base.strip()


def find_base(folder: Path, repo_id: str | None, ref: str) -> BaseChoice:
    """The base of the instruct model at ``folder`` (``repo_id`` when it came from the Hub)."""
    from_card = base_from_card(read_card_data(folder), repo_id)
    if from_card:
        return BaseChoice(from_card, "the instruct model's card (base_model)")
    if repo_id and repo_id.lower() in known_pairs():
        return BaseChoice(known_pairs()[repo_id.lower()], "hf-residual's table of known pairs")
    raise ConfigError(
        f"{ref}: cannot tell which base it was fine-tuned from (its card has no single base_model and it is "
        "not in hf-residual's table of known pairs). Pass --base BASE (the model it was fine-tuned from), "
        "or give a residual made by hf-residual extract as SOURCE"
    )


def agreed_license(cards: list[dict]) -> dict:
    """``license`` (with ``license_name``/``license_link``) when every parent's card states the same one."""
    if not cards:
        return {}
    out = {}
    for key in ("license", "license_name", "license_link"):
        values = [c.get(key) for c in cards]
        if values[0] is not None and all(v == values[0] for v in values):
            out[key] = values[0]
        elif key == "license":
            return {}
    return out
