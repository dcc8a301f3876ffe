"""A port recipe: the settings that decide how a residual is combined (``alpha``, ``alpha_for``,
``method``), saved as YAML so that ``hf-residual tune`` can hand its choice to ``port --recipe`` (and
``apply --recipe``), and a user can read, edit and version it.

The file::

    hf_residual_recipe: 1
    alpha: 1.0
    method: ties:density=0.5
    alpha_for:            # in order: the first pattern that re.search-es a tensor name sets its alpha
    - pattern: embed_tokens|lm_head
      alpha: 0.5
    notes: {}             # free-form (tune records its scores and models here); not read by port

Floats are written with Python's ``repr`` (shortest round-trip), so a loaded recipe gives the same
alphas bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hf_residual.core import methods
from hf_residual.errors import ConfigError

VERSION = 1
_KEYS = {"hf_residual_recipe", "alpha", "alpha_for", "method", "notes"}


@dataclass
class Recipe:
    """What ``port``/``apply`` take besides the models: ``port(..., **recipe.port_kwargs())``."""

    alpha: float = 1.0
    alpha_for: dict[str, float] = field(default_factory=dict)
    method: str = methods.TASK_ARITHMETIC
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha):
            raise ConfigError(f"recipe alpha must be a finite number, got {self.alpha}")
        self.alpha_for = {str(k): float(v) for k, v in (self.alpha_for or {}).items()}
        methods.compile_alpha_for(self.alpha_for)
        self.method = methods.parse_method(self.method).spec  # canonical: ties:density=0.5
        self.notes = dict(self.notes or {})

    def port_kwargs(self) -> dict:
        """The keyword arguments of ``hf_residual.port`` / ``apply`` this recipe sets."""
        return {"alpha": self.alpha, "alpha_for": dict(self.alpha_for), "method": self.method}

    def to_dict(self) -> dict:
        return {
            "hf_residual_recipe": VERSION,
            "alpha": self.alpha,
            "method": self.method,
            "alpha_for": [{"pattern": p, "alpha": a} for p, a in self.alpha_for.items()],
            "notes": self.notes,
        }

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML (``port --recipe PATH`` reads it back)."""
        path = Path(path)
        text = "# hf-residual port recipe: hf-residual port SOURCE --to TARGET --recipe " + path.name + "\n"
        path.write_text(text + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe written by ``save`` (or by hand); unknown keys and bad values are errors."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} not found (write one with hf-residual tune, or by hand)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping (alpha, alpha_for, method, notes)")
        unknown = set(data) - _KEYS
        if unknown:
            raise ConfigError(
                f"recipe {path} has unknown keys {sorted(unknown)}; known: {sorted(_KEYS - {'hf_residual_recipe'})}"
            )
        if data.get("hf_residual_recipe", VERSION) != VERSION:
            raise ConfigError(
                f"recipe {path} is version {data['hf_residual_recipe']}; this hf-residual reads version {VERSION}"
            )
        return cls(
            alpha=data.get("alpha", 1.0),
            alpha_for=_alpha_for(data.get("alpha_for"), path),
            method=data.get("method", methods.TASK_ARITHMETIC),
            notes=data.get("notes") or {},
        )


def _alpha_for(value, path: Path) -> dict[str, float]:
    """A list of ``{pattern, alpha}`` (as saved) or a mapping pattern -> alpha (in file order)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list) and all(isinstance(r, dict) and set(r) == {"pattern", "alpha"} for r in value):
        return {r["pattern"]: r["alpha"] for r in value}
    raise ConfigError(
        f"recipe {path}: alpha_for must be a list of {{pattern: ..., alpha: ...}} entries (or a mapping)"
    )
