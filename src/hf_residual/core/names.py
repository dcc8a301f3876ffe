"""Tensor names of a target that stores the same network under a prefix (a multimodal wrapper).

A multimodal model often wraps a language model that is the same network as a text-only base:
``language_model.model.layers.0...`` in the wrapper is ``model.layers.0...`` in the base. When every base
tensor is found in the target under one prefix, the target is read through a *view* under the base's
names (``align_target``); the output keeps the target's names (``to_target_names``), and every target
tensor outside that prefix (a vision tower, a projector) is copied from the target byte for byte
(``extra_jobs``) and listed. Names that differ in any other way stay an error that lists the first
differing names.

The reverse (instruct and base are the wrapper, the target is the bare language model) is refused: the
output is the target's model, and porting onto it would silently drop the residual of the wrapper's
other parts. Port onto a wrapper, or use a text-only instruct/base pair.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from hf_residual.core.checkpoint import Checkpoint
from hf_residual.core.engine import Segment, Source, TensorJob
from hf_residual.core.safetensors_io import OutputTensor
from hf_residual.errors import IncompatibleModelsError

SHOWN = 5  # differing names listed in an error


@dataclass(frozen=True)
class TargetNames:
    """The target seen under the base's names: ``view`` (same files and offsets), and what was mapped."""

    view: Checkpoint
    prefix: str = ""
    extras: tuple[str, ...] = ()  # target tensors outside ``prefix``: copied unchanged


def _prefixes(have: set[str], names: set[str]) -> Counter:
    """For each dotted prefix ``p`` with ``p + name`` in ``have`` for some of ``names``: how many names."""
    counts: Counter = Counter()
    for other in have:
        for i, char in enumerate(other):
            if char == "." and other[i + 1 :] in names:
                counts[other[: i + 1]] += 1
    return counts


def _best(counts: Counter) -> tuple[str, int] | None:
    if not counts:
        return None
    prefix = min(counts, key=lambda p: (-counts[p], len(p), p))
    return prefix, counts[prefix]


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def align_target(target: Checkpoint, base_names: set[str]) -> TargetNames:
    """The target under the base's names: as it is, or through the one prefix that maps every base name.

    Returns the target unchanged when it holds every base name (or when no prefix fits at all, so that
    ``plans.check_target`` reports the usual missing/extra names). A prefix that fits most names but not
    all is an error listing the names that differ.
    """
    have = set(target.tensors)
    missing = base_names - have
    if not missing:
        return TargetNames(target)
    found = _best(_prefixes(have, base_names))
    if found is None or found[1] * 2 <= len(base_names):
        _refuse_reverse(target, base_names)
        return TargetNames(target)
    prefix, count = found
    if count < len(base_names):
        absent = [n for n in sorted(base_names) if prefix + n not in have]
        raise IncompatibleModelsError(
            f"the target ({target.path}) stores most of the base's tensors under the prefix {prefix!r}, but "
            f"not all: {len(absent)} base tensor(s) have no {prefix!r} counterpart ({_listing(absent)}); "
            f"target tensors outside the prefix: {_listing(have - {prefix + n for n in base_names}) or 'none'}."
            " Names are mapped only when one prefix fits every base tensor"
        )
    inside = {n: info for n, info in target.tensors.items() if n.startswith(prefix)}
    view_tensors = {n[len(prefix) :]: info for n, info in inside.items()}
    view = Checkpoint(target.path, view_tensors, target.config, target.weights, prefix)
    extras = tuple(sorted(have - set(inside)))
    return TargetNames(view, prefix, extras)


def _refuse_reverse(target: Checkpoint, base_names: set[str]) -> None:
    """Instruct/base are a wrapper whose language model is the target: a clear error (see module doc)."""
    found = _best(_prefixes(base_names, set(target.tensors)))
    if found is None or found[1] < len(target.tensors):
        return
    prefix = found[0]
    left = sorted(n for n in base_names if not n.startswith(prefix))
    raise IncompatibleModelsError(
        f"the base and instruct models store the target's tensors under the prefix {prefix!r} and hold "
        f"{len(left)} more ({_listing(left)}): they wrap the target's network (a multimodal model?). "
        "hf-residual does not port a wrapper's residual onto its bare language model (the residual of the "
        "other parts would be dropped); port onto a model of the wrapper's architecture, or use a text-only "
        "instruct/base pair"
    )


def details(names: TargetNames, **checkpoints: Checkpoint) -> dict:
    """For a Result's details: the weight files read per role, and any prefix mapping with its copies."""
    found = {"weight_files": {r: c.weights.describe() for r, c in checkpoints.items() if c.weights}}
    if names.prefix:
        found.update(target_prefix=names.prefix, copied_from_target=list(names.extras))
    return found


def card_note(names: TargetNames) -> str:
    """A card section saying how names were mapped and which tensors were copied (empty if none)."""
    if not names.prefix:
        return ""
    copied = "\n".join(f"- `{name}`" for name in names.extras) or "- (none)"
    return (
        "\n## Tensor names\n\nThe target stores the base's network under the prefix "
        f"`{names.prefix}`; the residual was added there. These tensors of the target have no counterpart "
        f"in the base and were copied from the target unchanged:\n\n{copied}\n"
    )


def _renamed(job: TensorJob, prefix: str) -> TensorJob:
    job = dataclasses.replace(job, out=dataclasses.replace(job.out, name=prefix + job.out.name))
    quantize = getattr(job, "quantize", None)  # an FP8 output's block scales are named after it
    if quantize is not None:
        scale = dataclasses.replace(quantize.scale, name=prefix + quantize.scale.name)
        job = dataclasses.replace(job, quantize=dataclasses.replace(quantize, scale=scale))
    return job


def to_target_names(jobs: list[TensorJob], names: TargetNames) -> list[TensorJob]:
    """Jobs planned under the base's names, writing the target's names (``prefix`` put back)."""
    if not names.prefix:
        return jobs
    return [_renamed(job, names.prefix) for job in jobs]


def extra_jobs(target: Checkpoint, names: TargetNames) -> list[TensorJob]:
    """Copy each target tensor outside the mapped prefix into the output byte for byte."""
    jobs = []
    for name in names.extras:
        info = target.tensors[name]
        jobs.append(
            TensorJob(
                OutputTensor(name, info.dtype, info.shape), (Segment(0, info.numel, plus=Source(info)),)
            )
        )
    return jobs


def target_jobs(jobs: list[TensorJob], extras: list[TensorJob], names: TargetNames) -> list[TensorJob]:
    """``jobs`` (base names, buffers included) under the target's names, plus ``extras`` (the copies of
    ``extra_jobs``, after any FP8 handling), in name order."""
    return sorted([*to_target_names(jobs, names), *extras], key=lambda job: job.out.name)
