"""Model cards rendered from the Jinja templates in ``model_cards/`` (shipped as ``hf_residual.model_cards``).

Front matter lists every parent in ``base_model`` with ``base_model_relation`` so the Hub draws the
lineage: ``merge`` for a ported model, ``adapter`` for a residual repo. No token ever reaches a card.
"""

from __future__ import annotations

from importlib import resources

import yaml

from hf_residual._version import __version__
from hf_residual.core.manifest import Manifest, ModelIdentity

TAGS = ["hf-residual", "instruction-residual"]


def _template(name: str):
    import jinja2

    text = resources.files("hf_residual.model_cards").joinpath(name).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(text)


def _ref(identity: ModelIdentity) -> str:
    return identity.repo_id or identity.name


def _front_matter(
    parents: list[ModelIdentity],
    relation: str,
    extra_tags: list[str] | None = None,
    license: dict | None = None,
) -> str:
    """YAML front matter; ``license`` holds license (and license_name/link) only when all parents agree."""
    base_models = list(dict.fromkeys(p.repo_id for p in parents if p.repo_id)) or None
    data = {
        **(license or {}),
        "base_model": base_models,
        # The Hub refuses a relation without a base_model (every parent a local folder): leave both out.
        "base_model_relation": relation if base_models else None,
        "library_name": "transformers" if relation == "merge" else "hf-residual",
        "tags": TAGS + list(extra_tags or []),
    }
    data = {k: v for k, v in data.items() if v is not None}
    return yaml.safe_dump(data, sort_keys=False).strip()


def residual_card(
    manifest: Manifest, residual_ref: str = "RESIDUAL_FOLDER_OR_REPO", license: dict | None = None
) -> str:
    """README.md of a residual folder or repo."""
    return _template("residual.md.j2").render(
        card_data=_front_matter([manifest.instruct, manifest.base], "adapter", license=license),
        instruct=manifest.instruct,
        base=manifest.base,
        model_type=manifest.model_type,
        codec=manifest.codec_params.get("spec", manifest.codec),  # a lossy codec: its full spec
        n_tensors=len(manifest.tensors),
        tool_version=__version__,
        note=manifest.note,
        residual_ref=residual_ref,
    )


def ported_card(
    *,
    target: ModelIdentity,
    instruct: ModelIdentity,
    base: ModelIdentity,
    alpha: float,
    codec: str,
    distance: float,
    model_ref: str = "PATH_OR_REPO_OF_THIS_MODEL",
    license: dict | None = None,
    vocabulary: str | None = None,
    merge: dict | None = None,
) -> str:
    """README.md of a ported model; ``vocabulary``: which rows got the residual (a grown vocabulary).

    ``merge``: ``{"method": spec, "alpha_for": [{pattern, alpha, tensors}]}`` (``ops.options.Merge``);
    shown only when not the default (task_arithmetic, one alpha), so default cards are unchanged."""
    merge = merge or {}
    method = merge.get("method", "task_arithmetic")
    return _template("ported.md.j2").render(
        card_data=_front_matter([target, instruct, base], "merge", license=license),
        title=f"{_ref(target)} + instruction residual of {_ref(instruct)}",
        target=target,
        instruct=instruct,
        base=base,
        alpha=alpha,
        codec=codec,
        distance=distance,
        tool_version=__version__,
        model_ref=model_ref,
        vocabulary=vocabulary,
        method=None if method == "task_arithmetic" else method,
        alpha_for=merge.get("alpha_for") or [],
    )
