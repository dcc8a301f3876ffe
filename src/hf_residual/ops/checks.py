"""Checks run before any arithmetic: does the target descend from the base, is the residual non-zero.

What is measured and the limits are explained in ``core.lineage``.
"""

from __future__ import annotations

import hashlib
import json
import math

from hf_residual.core import lineage, plans
from hf_residual.core.checkpoint import Checkpoint
from hf_residual.core.fp8 import is_scaled
from hf_residual.core.manifest import Manifest, ModelIdentity
from hf_residual.core.safetensors_io import FLOAT_DTYPES
from hf_residual.errors import IncompatibleModelsError, NotADescendantError


def base_samples(base: Checkpoint) -> dict[str, list[float]]:
    """The lineage sample of every floating-point tensor (integer/bool buffers are not weights)."""
    return {
        name: lineage.sample(info)
        for name, info in base.tensors.items()
        if info.dtype in FLOAT_DTYPES or is_scaled(info)
    }


def fingerprint(samples: dict[str, list[float]]) -> str:
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()
    return f"samples-sha256:{digest[:16]}"


def check_descendant(
    target: Checkpoint,
    base_samples: dict[str, list[float]],
    force: bool,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> float:
    """Refuse a target that does not descend from the base; return the median distance per matrix.

    The target is sampled where the base was (the count of each stored sample gives the positions, so the
    16-element samples of older manifests still work); see ``lineage`` for what is measured.
    ``base_shapes``: a target with a grown vocabulary is sampled within the base's rows.
    """
    within = {n: math.prod(s) for n, s in (base_shapes or {}).items()}
    target_samples = {
        name: lineage.sample(target.tensors[name], len(values), within.get(name))
        for name, values in base_samples.items()
    }
    ndim = {name: len(target.tensors[name].shape) for name in base_samples}
    distance = lineage.relative_distance(target_samples, base_samples, ndim)
    if distance.matrices > lineage.MAX_RELATIVE_DISTANCE and not force:
        raise NotADescendantError(
            f"the target ({target.path}) does not look like a descendant of the base: {distance.describe()}. "
            "Continued pre-training and fine-tunes measured 0.03-0.4; a model of the same shape trained "
            f"apart from the base gives 1.0-1.5; the limit is {lineage.MAX_RELATIVE_DISTANCE}. Adding this "
            "residual would damage the model. If you are sure, pass --force"
        )
    return distance.matrices


def check_residual_not_zero(ratio: float, force: bool, instruct: str, base: str) -> None:
    """Refuse a residual that is zero, or far smaller than any instruction tuning gives (see ``lineage``)."""
    if ratio >= lineage.MIN_RESIDUAL_RATIO or force:
        return
    measured = "all zero" if ratio == 0 else f"|R| / |B| = {ratio:.1e}"
    raise IncompatibleModelsError(
        f"the residual instruct - base is {measured} (RMS over tensors of each tensor's |R| / |B|; instruction "
        f"tuning gives 1e-2 or more, the limit is {lineage.MIN_RESIDUAL_RATIO:g}): the instruct model "
        f"({instruct}) and the base ({base}) look like the same model. Give the instruction-tuned model as the "
        "source and the model it was tuned from as --base. If you mean it, pass --force"
    )


def check_sampled_residual(
    pairs: list[plans.PairedTensor], samples: dict[str, list[float]], force: bool
) -> None:
    """The zero-residual check for extract and port, on the lineage sample, before any arithmetic."""
    if force or not pairs:
        return
    instruct = {p.name: lineage.sample(p.instruct, within=p.base.numel) for p in pairs}
    ratio = lineage.residual_ratio(lineage.sample_norms(instruct, {p.name: samples[p.name] for p in pairs}))
    check_residual_not_zero(ratio, force, str(pairs[0].instruct.file.parent), str(pairs[0].base.file.parent))


def check_manifest_residual(manifest: Manifest, force: bool) -> None:
    """The zero-residual check for apply, from the manifest's exact norms (skipped if it has none)."""
    norms = [(e.residual_norm, e.base_norm) for e in manifest.tensors.values() if e.base_norm > 0]
    if norms:
        ratio = lineage.residual_ratio(norms)
        check_residual_not_zero(ratio, force, ref_of(manifest.instruct), ref_of(manifest.base))


def ref_of(identity: ModelIdentity) -> str:
    return identity.repo_id or identity.name
