"""The search space: a candidate is a port's settings, ``alpha``, ``alpha_for`` (regex -> alpha) and ``method``.

Per-group alpha is sampled as factors of the global alpha: one per module kind (embeddings and head,
attention, MLP) and one per layer band (early, middle, late thirds of the layers); a tensor's alpha is
``alpha x module factor x band factor``, written out as ``alpha_for`` regexes (first match wins) so that
``port --recipe`` needs nothing of this module. Values sit on grids (alpha 0.05, factors 0.1, density and
p 0.1) so recipes stay readable and repeated suggestions hit the cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from hf_residual.errors import ConfigError

DIMENSIONS = ("alpha", "groups", "method")
MODULES = {"embed": r"(^|\.)(embed_tokens|lm_head)\.", "attn": r"\.self_attn\.", "mlp": r"\.mlp\."}
BANDS = ("early", "middle", "late")
METHODS = ("task_arithmetic", "ties", "dare", "orthogonal")
ALPHA_RANGE = (0.5, 1.5, 0.05)
FACTOR_RANGE = (0.5, 1.5, 0.1)
DENSITY_RANGE = (0.2, 0.9, 0.1)
DROP_RANGE = (0.1, 0.7, 0.1)
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Candidate:
    """One point of the search: the settings ``hf_residual.port`` takes, in the order they apply."""

    alpha: float = 1.0
    alpha_for: tuple[tuple[str, float], ...] = ()
    method: str = "task_arithmetic"

    @property
    def is_default(self) -> bool:
        return self.alpha == 1.0 and not self.alpha_for and self.method == "task_arithmetic"

    def port_kwargs(self) -> dict:
        """Keyword arguments of ``hf_residual.port`` (``alpha_for`` and ``method`` only when not default)."""
        kwargs: dict = {"alpha": self.alpha}
        if self.alpha_for:
            kwargs["alpha_for"] = dict(self.alpha_for)
        if self.method != "task_arithmetic":
            kwargs["method"] = self.method
        return kwargs

    def key_data(self) -> str:
        return json.dumps([self.alpha, [list(p) for p in self.alpha_for], self.method])

    def describe(self) -> str:
        parts = [f"alpha {self.alpha:g}"]
        parts += [f"{pattern}={value:g}" for pattern, value in self.alpha_for]
        if self.method != "task_arithmetic":
            parts.append(self.method)
        return ", ".join(parts)


@dataclass(frozen=True)
class Space:
    """Which dimensions are searched, and the tensor groups the models have (groups that match no tensor
    of the base are left out, so a non-Llama naming just searches fewer factors)."""

    dimensions: tuple[str, ...] = DIMENSIONS
    modules: tuple[str, ...] = tuple(MODULES)
    bands: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.dimensions) - set(DIMENSIONS)
        if unknown or not self.dimensions:
            raise ConfigError(
                f"unknown search dimension(s) {sorted(unknown)}; choose from {', '.join(DIMENSIONS)}"
            )


def layer_bands(layers: int) -> dict[str, tuple[int, ...]]:
    """Early, middle and late thirds of ``layers`` (empty thirds left out: 2 layers give early and late)."""
    cuts = [0, round(layers / 3), round(2 * layers / 3), layers]
    bands = {name: tuple(range(cuts[i], cuts[i + 1])) for i, name in enumerate(BANDS)}
    return {name: band for name, band in bands.items() if band}


def space_for(tensor_names: list[str], dimensions: tuple[str, ...] = DIMENSIONS) -> Space:
    """The space for a model whose tensors are ``tensor_names``: module groups and layer bands that exist."""
    modules = tuple(m for m, p in MODULES.items() if any(re.search(p, n) for n in tensor_names))
    layers = {int(m.group(2)) for n in tensor_names if (m := _LAYER.search(n))}
    bands = layer_bands(max(layers) + 1) if layers else {}
    return Space(tuple(dimensions), modules, bands)


def _grid(trial, name: str, bounds: tuple[float, float, float]) -> float:
    low, high, step = bounds
    return round(trial.suggest_float(name, low, high, step=step), 6)


def suggest(trial, space: Space) -> Candidate:
    """The candidate an Optuna trial proposes (parameters named ``alpha``, ``x_<group>``, ``method``...)."""
    alpha = _grid(trial, "alpha", ALPHA_RANGE) if "alpha" in space.dimensions else 1.0
    factors: dict[str, float] = {}
    if "groups" in space.dimensions:
        for group in (*space.modules, *space.bands):
            factors[group] = _grid(trial, f"x_{group}", FACTOR_RANGE)
    method = "task_arithmetic"
    if "method" in space.dimensions:
        method = trial.suggest_categorical("method", list(METHODS))
        if method == "ties":
            method = f"ties:density={_grid(trial, 'density', DENSITY_RANGE):g}"
        elif method == "dare":
            method = f"dare:p={_grid(trial, 'p', DROP_RANGE):g},seed=0"
    return Candidate(alpha, alpha_for(alpha, factors, space.bands), method)


def first_params(space: Space) -> list[dict]:
    """The trials enqueued first: alpha = 1, every factor 1, task arithmetic (the paper's port, the
    reference); then, when the method is searched, each other method in its plain form at alpha = 1
    (``ties`` and ``dare`` at 0.5), so every method is on the table whatever the budget; then, when alpha
    is searched, task arithmetic at both ends of the alpha range (0.5 and 1.5). The ends show how far the
    trade reaches, and they find a residual whose scale is off (one over-scaled 2x is restored by alpha 0.5),
    which random start-up draws over 21 alphas and 5+ other dimensions miss at small budgets
    (docs/TUNE.md)."""
    params: dict = {"alpha": 1.0} if "alpha" in space.dimensions else {}
    if "groups" in space.dimensions:
        params.update({f"x_{g}": 1.0 for g in (*space.modules, *space.bands)})
    first = [params]
    if "method" in space.dimensions:
        plain = [{"method": "task_arithmetic"}, {"method": "orthogonal"}]
        plain += [{"method": "ties", "density": 0.5}, {"method": "dare", "p": 0.5}]
        first = [{**params, **method} for method in plain]
    if "alpha" in space.dimensions:
        first += [{**first[0], "alpha": end} for end in (ALPHA_RANGE[0], ALPHA_RANGE[1])]
    return first


def alpha_for(alpha: float, factors: dict[str, float], bands: dict[str, tuple[int, ...]]) -> tuple:
    """``alpha_for`` entries (regex, alpha), first match wins, for ``alpha x module factor x band factor``.

    Entries equal to what the name would get without them are left out, so all factors 1 give none.
    """

    def value(*names: str) -> float:
        scale = alpha
        for name in names:
            scale *= factors.get(name, 1.0)
        return round(scale, 6)

    entries: list[tuple[str, float]] = []
    if value("embed") != alpha:
        entries.append((MODULES["embed"], value("embed")))
    banded = any(factors.get(b, 1.0) != 1.0 for b in bands)
    for band, layers in bands.items() if banded else [("", ())]:
        prefix = r"(^|\.)layers\.(" + "|".join(map(str, layers)) + ")" if layers else ""
        for module in ("attn", "mlp"):
            if value(band, module) != value(band):
                pattern = prefix + MODULES[module] if prefix else MODULES[module]
                entries.append((pattern, value(band, module)))
        if prefix and value(band) != alpha:
            entries.append((prefix + r"\.", value(band)))
    return tuple(entries)
