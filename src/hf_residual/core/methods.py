"""Merge methods (``--method``) and per-tensor alpha rules (``--alpha-for``) for ``port`` and ``apply``.

Every method changes only the residual ``R`` of a tensor (``R = I - B`` in ``port``, the stored residual
in ``apply``) before it is scaled and added: ``out = T + alpha * method(R)``, all in float32, one rounding
to the target's dtype at the end. The engine calls ``SegmentMethod.apply`` on each block of ``R``
(``engine._compute``, the numpy path; segments with a method never take the fused kernels).

- ``task_arithmetic`` (default, Jindal et al. 2024; Ilharco et al. 2023): ``method(R) = R``. No method
  object at all, so the output is bit for bit what it was before methods existed.
- ``ties:density=D`` (after Yadav et al. 2023, "TIES-Merging", and mergekit's ``ties``): the CPT update
  ``D = T - B`` and ``R`` are the two task vectors. ``trim(X)`` keeps the entries with
  ``|X| >= t``, ``t`` the k-th largest ``|X|`` of the tensor, ``k = int(D * numel)`` (entries tied at
  ``t`` are all kept; ``k = 0`` keeps none; ``D >= 1`` keeps all). The elected sign of an entry is ``+``
  where ``trim(D) + trim(R) >= 0`` (float32 sum) and ``-`` elsewhere (mergekit's ``get_mask(method="sum")``).
  ``method(R) = trim(R)`` where its sign equals the elected sign, else 0. Unlike TIES-Merging's disjoint
  mean, D is not added (the target already holds it): only the kept entries of R are. ``t`` is found
  exactly by a two-pass radix select over the float32 bit patterns of ``|R|`` and ``|D|``, streamed
  block by block (``_Thresholds``): memory two 65536-bin histograms, never a whole tensor.
- ``dare:p=P,seed=S`` (Yu et al. 2024, "Language Models are Super Mario"): each entry of R is dropped
  with probability P and the kept ones are multiplied by ``float32(1 / (1 - P))``. The drop mask is a
  pure function of (seed, tensor name, element index in the residual tensor): splitmix64 of a per-tensor
  key plus the index, so block-by-block and whole-tensor computations agree.
- ``orthogonal``: ``method(R) = R - c * D`` per tensor, ``c = float32(<R, D> / <D, D>)`` (0 when D is
  0): R without its component along the CPT update, so what CPT moved is not moved again. The dot
  products are exact (``ExactDot``, one streamed pre-pass), the quotient rounded to float64 then float32;
  then ``c * D`` and the subtraction are float32 operations. Measured while planning issue 16 on the
  quick demo family: IF 0.70 / new knowledge 0.46 against 0.61 / 0.48 for plain ``R`` (and 0.70 / 0.35
  for plain ``R`` at alpha 1.2).

Thresholds, coefficients and masks are per residual segment; a tensor has one, except the embedding-like tensors of a
target with a grown vocabulary, whose residual rows come in runs (one threshold per run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from hf_residual.errors import ConfigError

TASK_ARITHMETIC = "task_arithmetic"
METHODS = {
    TASK_ARITHMETIC: {},
    "ties": {"density": None},
    "dare": {"p": None, "seed": 0},
    "orthogonal": {},
}
METHOD_HELP = (
    "how the residual R is combined: task_arithmetic (default: TARGET + alpha * R), ties:density=D "
    "(keep R's top-D fraction of magnitudes per tensor whose sign agrees with the sign elected from "
    "trimmed D = TARGET - BASE and R; needs BASE), dare:p=P,seed=S (drop R's entries with probability "
    "P, rescale the kept by 1/(1-P); seeded, reproducible), orthogonal (R minus its projection on D, per "
    "tensor; needs BASE)"
)

Decode = Callable[[object, int, int, np.ndarray], None]  # engine: decode(source, offset, count, out)


@dataclass(frozen=True)
class Method:
    """A parsed ``--method`` spec: its name and parameters (all of them, defaults filled in)."""

    name: str
    params: tuple[tuple[str, float | int], ...] = ()

    @property
    def spec(self) -> str:
        """The canonical spec string, e.g. ``ties:density=0.5`` (parses back to the same ``Method``)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    @property
    def needs_base(self) -> bool:
        """Whether the base model must be read (``ties`` elects signs against ``D = T - B``)."""
        return self.name in ("ties", "orthogonal")

    @property
    def is_default(self) -> bool:
        return self.name == TASK_ARITHMETIC

    def for_segment(self, name: str, segment, base_source=None) -> SegmentMethod | None:
        """The per-segment object the engine calls, or None (``task_arithmetic``: nothing to do).

        ``base_source``: the base's elements of this segment (``apply``); None takes ``segment.minus``
        (``port``, where ``R = plus - minus``)."""
        p = dict(self.params)
        if self.name == "ties":
            base = base_source if base_source is not None else segment.minus
            if base is None:  # pragma: no cover - ops check this before planning
                raise ConfigError(f"the ties method needs the base model ({name!r} has no base)")
            return Ties(name, float(p["density"]), base)
        if self.name == "dare":
            return Dare(name, float(p["p"]), int(p["seed"]))
        if self.name == "orthogonal":
            return Orthogonal(name, base_source if base_source is not None else segment.minus)
        return None


def parse_method(spec: str) -> Method:
    """``"ties:density=0.5"`` -> ``Method``; a clear error for an unknown method or parameter."""
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in METHODS:
        raise ConfigError(f"unknown merge method {spec!r}; choose one of: {', '.join(METHODS)}")
    params = dict(METHODS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in params:
            allowed = ", ".join(f"{k}=..." for k in params) or "no parameters"
            raise ConfigError(f"invalid parameter {item!r} in method {spec!r}; {name} takes {allowed}")
        try:
            params[key] = int(value) if key == "seed" else float(value)
        except ValueError:
            raise ConfigError(f"parameter {key} of method {spec!r} must be a number, got {value!r}") from None
    missing = [k for k, v in params.items() if v is None]
    if missing:
        example = {"ties": "ties:density=0.5", "dare": "dare:p=0.5,seed=0"}[name]
        raise ConfigError(f"method {spec!r} needs {', '.join(missing)}: write it like {example}")
    if name == "ties" and not 0.0 < params["density"] <= 1.0:
        raise ConfigError(f"ties density must be in (0, 1], got {params['density']}")
    if name == "dare" and not 0.0 <= params["p"] < 1.0:
        raise ConfigError(f"dare p (the drop probability) must be in [0, 1), got {params['p']}")
    return Method(name, tuple(params.items()))


# --- per-tensor alpha -----------------------------------------------------------------------------------


def parse_alpha_for(items: Iterable[str]) -> dict[str, float]:
    """CLI ``PATTERN=VALUE`` items -> an ordered dict (the value after the last ``=``)."""
    rules: dict[str, float] = {}
    for item in items:
        pattern, eq, value = item.rpartition("=")
        if not eq or not pattern:
            raise ConfigError(
                f"--alpha-for {item!r}: write it as PATTERN=VALUE, e.g. 'embed_tokens|lm_head=0.5'"
            )
        try:
            rules[pattern] = float(value)
        except ValueError:
            raise ConfigError(f"--alpha-for {item!r}: {value!r} is not a number") from None
    return rules


def compile_alpha_for(alpha_for: dict[str, float] | None) -> list[tuple[str, re.Pattern, float]]:
    """Check and compile the rules, in order; an invalid regex or a non-finite alpha is an error."""
    compiled = []
    for pattern, alpha in (alpha_for or {}).items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"alpha_for pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from None
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ConfigError(f"alpha_for {pattern!r}: alpha must be a finite number, got {alpha}")
        compiled.append((pattern, regex, alpha))
    return compiled


def resolve_alphas(
    names: Iterable[str], alpha_for: dict[str, float] | None, default: float
) -> tuple[dict[str, float], list[dict]]:
    """Each tensor's alpha (the first pattern that ``re.search``-es its name, else ``default``).

    Returns the alphas and the table recorded in the details and card: one row per pattern with the
    number of tensors it set. A pattern that matches no tensor name at all is an error (a typo, most
    likely); one whose tensors all went to earlier patterns is kept with 0 in the table.
    """
    rules = compile_alpha_for(alpha_for)
    names = sorted(names)
    alphas: dict[str, float] = {}
    counts = [0] * len(rules)
    for name in names:
        for i, (_, regex, alpha) in enumerate(rules):
            if regex.search(name):
                alphas[name] = alpha
                counts[i] += 1
                break
        else:
            alphas[name] = default
    for pattern, regex, _ in rules:
        if not any(regex.search(n) for n in names):
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise ConfigError(
                f"alpha_for pattern {pattern!r} matches no tensor name (a typo?). Patterns are Python regular "
                f"expressions searched in names such as {shown}"
            )
    table = [{"pattern": p, "alpha": a, "tensors": c} for (p, _, a), c in zip(rules, counts, strict=True)]
    return alphas, table


# --- the per-segment methods the engine calls -----------------------------------------------------------


class SegmentMethod:
    """What the engine calls on each block of a segment's residual, before alpha and the addend."""

    def apply(self, r: np.ndarray, segment, offset: int, decode: Decode) -> None:  # pragma: no cover
        raise NotImplementedError


# splitmix64 (Steele, Lea and Flood 2014): the golden-ratio increment and the two mixing multipliers
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def dare_key(seed: int, name: str) -> int:
    """The per-tensor key: the first 8 bytes (little endian) of BLAKE2b("{seed}:{name}")."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def dare_drop(seed: int, name: str, p: float, start: int, count: int) -> np.ndarray:
    """Dropped entries ``start:start+count``: ``splitmix64(key + i * gamma) >> 11 < int(p * 2**53)``.

    In place on two uint64 scratch arrays (about 4x faster than the plain expressions)."""
    z = np.arange(start, start + count, dtype=np.uint64)
    t = np.empty_like(z)
    np.multiply(z, _GAMMA, out=z)
    np.add(z, np.uint64(dare_key(seed, name)), out=z)
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        if factor is not None:
            z *= factor
    np.right_shift(z, np.uint64(11), out=z)
    return z < np.uint64(int(p * 2**53))


@dataclass(frozen=True)
class Dare(SegmentMethod):
    name: str
    p: float
    seed: int

    def apply(self, r: np.ndarray, segment, offset: int, decode: Decode) -> None:
        drop = dare_drop(self.seed, self.name, self.p, segment.plus.start + offset, r.size)
        r *= np.float32(1.0 / (1.0 - self.p))
        np.putmask(r, drop, np.float32(0))


@dataclass(frozen=True)
class Ties(SegmentMethod):
    name: str
    density: float
    base: object  # the Source of the base's elements of this segment
    # (|R| threshold, |D| threshold), found on the first block (a pre-pass over the whole segment)
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def apply(self, r: np.ndarray, segment, offset: int, decode: Decode) -> None:
        if "t" not in self.cache:
            self.cache["t"] = self._thresholds(segment, r.size, decode)
        t_r, t_d = self.cache["t"]
        d, scratch = _update_block(segment, self.base, offset, r.size, decode)
        np.abs(d, out=scratch)
        np.putmask(d, scratch < t_d, np.float32(0))  # trim(D)
        d += r  # trim(D) + R: the elected sum wherever R survives its own trim
        drop = np.greater_equal(d, 0)
        drop ^= r > 0  # sign of R differs from the elected sign
        np.abs(r, out=scratch)
        drop |= scratch < t_r  # below R's threshold
        np.putmask(r, drop, np.float32(0))
        r += np.float32(0)  # -0.0 -> +0.0: a dropped or zero entry is +0, as in where(keep, R, 0)

    def _thresholds(self, segment, chunk: int, decode: Decode) -> tuple[np.float32, np.float32]:
        """Exact k-th largest ``|R|`` and ``|D|`` of the segment: two streamed passes of a radix select."""
        n = segment.stop - segment.start
        k = int(self.density * n)
        if self.density >= 1.0:
            return np.float32(0), np.float32(0)
        if k == 0:
            return np.float32(np.inf), np.float32(np.inf)

        def blocks():
            for r, d in _residual_blocks(segment, self.base, chunk, decode):
                yield _magnitude_bits(r), _magnitude_bits(d)

        high = [np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)]
        for pair in blocks():
            for hist, bits in zip(high, pair, strict=True):
                hist += np.bincount(bits >> 16, minlength=1 << 16)
        tops = [_select(hist, k) for hist in high]
        low = [np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)]
        for pair in blocks():
            for hist, bits, (top, _) in zip(low, pair, tops, strict=True):
                hist += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
        found = []
        for hist, (top, above) in zip(low, tops, strict=True):
            bottom, _ = _select(hist, k - above)
            found.append(np.array([(top << 16) | bottom], np.uint32).view(np.float32)[0])
        return found[0], found[1]


@dataclass(frozen=True)
class Orthogonal(SegmentMethod):
    """``R - c * D`` with ``c = <R, D> / <D, D>`` (0 when D is 0): R without its component along D."""

    name: str
    base: object
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def apply(self, r: np.ndarray, segment, offset: int, decode: Decode) -> None:
        if "c" not in self.cache:
            self.cache["c"] = self._coefficient(segment, r.size, decode)
        d, _ = _update_block(segment, self.base, offset, r.size, decode)
        d *= self.cache["c"]
        r -= d

    def _coefficient(self, segment, chunk: int, decode: Decode) -> np.float32:
        """``float32(float64(<R, D> / <D, D>))`` from the exact dot products (``ExactDot``), one pass."""
        rd, dd = ExactDot(), ExactDot()
        for r, d in _residual_blocks(segment, self.base, chunk, decode):
            r_parts, d_parts = significands(r), significands(d)
            rd.add_parts(r_parts, d_parts)
            dd.add_parts(d_parts, d_parts)
        num, den = rd.value(), dd.value()
        return np.float32(0) if den == 0 else np.float32(float(Fraction(num) / Fraction(den)))


class ExactDot:
    """An exact float32 dot product, streamed: ``x_i * y_i`` is ``mx * my * 2^(ex + ey)`` with 24-bit
    integer significands; the 48-bit products, split in two 24-bit halves, are summed per exponent with
    ``bincount`` (exact: integer sums below 2^53 per block of up to 2^29 elements) into int64 bins."""

    BINS = 553  # exponent sums of two float32 values (frexp: -148..128 each), offset by 296

    def __init__(self) -> None:
        self.hi = np.zeros(self.BINS, np.int64)
        self.lo = np.zeros(self.BINS, np.int64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.add_parts(significands(x), significands(y))

    def add_parts(self, x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray]) -> None:
        """``x``, ``y``: ``significands`` of the two arrays (shared when one array is in two products)."""
        p = x[0] * y[0]
        exp = x[1] + y[1]
        # float64 weights: bincount converts int64 ones element by element (4x slower); both halves exact
        self.hi += np.bincount(exp, weights=(p >> 24).astype(np.float64), minlength=self.BINS).astype(
            np.int64
        )
        self.lo += np.bincount(exp, weights=(p & 0xFFFFFF).astype(np.float64), minlength=self.BINS).astype(
            np.int64
        )

    def value(self) -> Fraction:
        total = sum(
            (int(h) * (1 << 24) + int(lo)) << b
            for b, (h, lo) in enumerate(zip(self.hi, self.lo, strict=True))
        )
        return Fraction(total, 1 << (296 + 48))


def significands(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x = m * 2^(e - 24 - 148)`` with integer ``|m| < 2^24`` (int64) and ``e >= 0`` (frexp, offset)."""
    m, e = np.frexp(x)
    return (m * np.float32(1 << 24)).astype(np.int64), e.astype(np.int64) + 148


def _update_block(segment, base, offset: int, count: int, decode: Decode) -> tuple[np.ndarray, np.ndarray]:
    """``D = T - B`` for the segment's elements ``offset:offset+count`` (and the scratch array used)."""
    d, scratch = np.empty(count, np.float32), np.empty(count, np.float32)
    decode(_unhashed(segment.addend), offset, count, d)
    decode(_unhashed(base), offset, count, scratch)
    d -= scratch
    return d, scratch


def _residual_blocks(segment, base, chunk: int, decode: Decode):
    """``(R, D)`` of the whole segment, ``chunk`` elements at a time (views of reused buffers)."""
    n = segment.stop - segment.start
    bufs = [np.empty(chunk, np.float32) for _ in range(3)]
    for at in range(0, n, chunk):
        count = min(chunk, n - at)
        r, d, b = (buf[:count] for buf in bufs)
        decode(_unhashed(segment.plus), at, count, r)
        if segment.minus is not None:
            decode(_unhashed(segment.minus), at, count, b)
            r -= b
        decode(_unhashed(segment.addend), at, count, d)
        decode(_unhashed(base), at, count, b)
        d -= b
        yield r, d


def _unhashed(source):
    """The source without its digest: the pre-pass and D reads must not feed the input checksum."""
    return dataclasses.replace(source, sha256=None) if getattr(source, "sha256", None) else source


def _magnitude_bits(values: np.ndarray) -> np.ndarray:
    """The bit patterns of ``|values|`` (ordered like the magnitudes)."""
    return values.view(np.uint32) & np.uint32(0x7FFFFFFF)


def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The highest bin ``h`` with at least ``k`` counts in bins ``>= h``, and the count in bins ``> h``."""
    above = np.cumsum(hist[::-1])[::-1]  # above[h] = count in bins >= h
    h = int(np.nonzero(above >= k)[0][-1])
    return h, int(above[h + 1]) if h + 1 < hist.size else 0
