"""A target whose vocabulary grew (continual pre-training added tokens): which embedding rows get the residual.

Decided from the tokenizers and the tensor shapes together (padded vocabularies give new tokens ids
*inside* the base's rows). ``B`` is the base's rows, ``n_b`` the base tokenizer's token count (recorded in
the manifest as ``base_tokens``; read from the base in ``port``). The target's new tokens are its tokens
with ids from ``n_b`` on. The output has ``max(target rows, instruct rows)`` rows (config ``vocab_size``):

- a target-new token the instruct does not have: the **target's row**, as it is;
- any other row below ``B`` (shared tokens, the instruct's new tokens inside the base's padding rows,
  padding): ``target + alpha * residual``;
- rows from ``B`` on: the **instruct's row** where the instruct has one (its new tokens, e.g. chat tokens;
  a token both added at the same id), else the target's row.

Tokens: the output's tokenizer is the instruct's (its chat template, special tokens, generation config)
with the target's new tokens added at their ids. Conflicts are refused, never guessed: a target-new id
holding another string in the instruct, or a target-new string the instruct holds at another id. With
``vocab_from="target"`` the target's token (and row) wins each conflict and the instruct's is dropped;
with ``"instruct"`` the instruct's wins and the target's token is dropped (its row then follows the rules
above). Rows are never moved to other ids.

The layout itself (token tables, ``Layout``, ``plan``) is built in ``vocab_layout``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hf_residual.core.engine import Segment, Source, TensorJob
from hf_residual.core.safetensors_io import OutputTensor, TensorInfo
from hf_residual.core.vocab_layout import Layout, is_plain, plan, token_count, token_table, tokenizer_json
from hf_residual.errors import ConfigError, IncompatibleModelsError, VerificationError

VOCAB_FROM = ("target", "instruct")
LAYOUT_FILE = "vocabulary_rows.json"
__all__ = ["Layout", "is_plain", "plan", "token_count", "token_table"]  # re-exported from vocab_layout


def check_vocab_from(value: str | None) -> str | None:
    if value is not None and value not in VOCAB_FROM:
        raise ConfigError(f"vocab_from must be 'target' or 'instruct', got {value!r}")
    return value


def vocab_names(base_shapes: dict[str, tuple[int, ...]], base_rows: int) -> list[str]:
    """The embedding-like tensors: 2-d, with the base's vocabulary rows."""
    return sorted(n for n, s in base_shapes.items() if len(s) == 2 and s[0] == base_rows)


def target_shapes(
    base_shapes: dict[str, tuple[int, ...]], target: dict[str, TensorInfo], names: list[str]
) -> dict[str, tuple[int, ...]]:
    """``base_shapes`` with the target's (grown) rows for the embedding-like tensors, for ``check_target``."""
    shapes = dict(base_shapes)
    for name in names:
        info = target.get(name)
        if info is not None and info.shape[1:] == shapes[name][1:] and info.shape[0] > shapes[name][0]:
            shapes[name] = info.shape
    return shapes


def layout_job(
    name: str,
    out_dtype: str,
    width: int,
    layout: Layout,
    *,
    target: TensorInfo,
    residual_segment,
    instruct_rows: TensorInfo,
) -> TensorJob:
    """One embedding-like tensor laid out by ``layout``; ``residual_segment(start, stop)`` builds the sums.

    ``instruct_rows``: the tensor whose rows from ``B`` on are the instruct's (the instruct model's own
    tensor in ``port``; the residual, whose rows there are absolute, in ``apply``)."""
    segments = []
    for start, stop, kind in layout.runs:
        a, b = start * width, stop * width
        if kind == "residual":
            segments.append(residual_segment(a, b))
        elif kind == "target":
            segments.append(Segment(a, b, plus=Source(target, a)))
        else:
            segments.append(Segment(a, b, plus=Source(instruct_rows, a)))
    return TensorJob(OutputTensor(name, out_dtype, (layout.rows, width)), tuple(segments))


def reads_in_order(job: TensorJob, info: TensorInfo) -> bool:
    """True when ``job`` reads every element of ``info`` once, in order (the engine's digest check)."""
    position = 0
    for segment in job.segments:
        for source in (segment.plus, segment.minus, segment.addend):
            if source is not None and source.info == info:
                if source.start != position:
                    return False
                position += segment.stop - segment.start
    return position == info.numel


def verify_digest(info: TensorInfo, expected: str) -> None:
    """sha256 of a residual tensor read apart from the arithmetic (its rows are not all read in order)."""
    digest = hashlib.sha256()
    with open(info.file, "rb") as handle:
        handle.seek(info.offset)
        left = info.nbytes
        while left:
            block = handle.read(min(left, 1 << 24))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    if digest.hexdigest() != expected:
        raise VerificationError(
            f"tensor {info.name!r} in {info.file} does not match the sha256 recorded for it in the manifest: "
            "the residual is damaged; re-download the residual, or re-extract it"
        )


def write_tokenizer(layout: Layout, staging: Path) -> None:
    """Add the target's new tokens (at their ids) to the instruct tokenizer copied into ``staging``."""
    path = staging / "tokenizer.json"
    if not layout.added and not layout.dropped:
        return
    data = tokenizer_json(staging)
    if data is None:
        raise IncompatibleModelsError(
            "the target added tokens but the instruct side has no tokenizer.json to add them to"
        )
    entries = {int(e["id"]): e for e in data.get("added_tokens") or []}
    vocab = (data.get("model") or {}).get("vocab")
    for i, entry in layout.added.items():
        if isinstance(vocab, dict):  # a model-vocabulary token at this id (never for new ids): remove it
            for s in [s for s, j in vocab.items() if j == i]:
                del vocab[s]
        entries[i] = {**entry, "id": i}
    contents = {e["content"]: i for i, e in entries.items() if i in layout.added}
    entries = {i: e for i, e in entries.items() if i in layout.added or e["content"] not in contents}
    data["added_tokens"] = [entries[i] for i in sorted(entries)]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    from tokenizers import Tokenizer

    check = Tokenizer.from_file(str(path))
    wrong = [e["content"] for i, e in layout.added.items() if check.token_to_id(e["content"]) != i]
    if wrong:  # pragma: no cover - tokenizers keeps explicit ids
        raise IncompatibleModelsError(f"could not place the target's tokens at their ids: {wrong[:5]}")
    config_path = staging / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for i, entry in layout.added.items():
                decoder[str(i)] = {k: v for k, v in entry.items() if k != "id"}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def write_layout(layout: Layout, staging: Path) -> None:
    (staging / LAYOUT_FILE).write_text(json.dumps(layout.summary(), indent=1, ensure_ascii=False) + "\n")


@dataclass
class VocabPlan:
    """The embedding-like tensors of a port/apply and, when the target's vocabulary differs, their layout."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]  # what ``check_target`` must see (grown rows allowed)
    layout: Layout | None = None

    def port_jobs(self, jobs: list[TensorJob], pairs, target, alpha: float) -> list[TensorJob]:
        """Replace the embedding-like tensors' jobs of ``plans.port_jobs`` by ``layout``'s."""
        if self.layout is None:
            return jobs
        by_name = {p.name: p for p in pairs}
        replaced = {}
        for name in self.names:
            p, t = by_name[name], target.tensors[name]
            width = t.shape[1]

            def residual(a, b, p=p, t=t):
                return Segment(
                    a,
                    b,
                    plus=Source(p.instruct, a),
                    minus=Source(p.base, a),
                    alpha=alpha,
                    addend=Source(t, a),
                )

            replaced[name] = layout_job(
                name,
                t.dtype,
                width,
                self.layout,
                target=t,
                residual_segment=residual,
                instruct_rows=p.instruct,
            )
        return [replaced.get(job.out.name, job) for job in jobs]

    def apply_jobs(
        self, jobs: list[TensorJob], residual, target, alpha: float, sha256: dict
    ) -> list[TensorJob]:
        """The same for ``plans.apply_jobs``; the replaced residual tensors' digests are checked here first."""
        if self.layout is None:
            return jobs
        replaced = {}
        for name in self.names:
            r, t = residual.tensors[name], target.tensors[name]
            if sha256.get(name):
                verify_digest(r, sha256[name])

            def segment(a, b, r=r, t=t):
                return Segment(a, b, plus=Source(r, a), alpha=alpha, addend=Source(t, a))

            replaced[name] = layout_job(
                name, t.dtype, t.shape[1], self.layout, target=t, residual_segment=segment, instruct_rows=r
            )
        return [replaced.get(job.out.name, job) for job in jobs]


def prepare(
    base_shapes: dict[str, tuple[int, ...]],
    base_rows: int | None,
    target,
) -> VocabPlan:
    """Step one, before ``check_target``: the embedding-like tensors and the shapes the target may have."""
    if not base_rows:
        return VocabPlan([], dict(base_shapes))
    names = vocab_names(base_shapes, base_rows)
    return VocabPlan(names, target_shapes(base_shapes, target.tensors, names))


def decide(
    vplan: VocabPlan,
    *,
    base_rows: int | None,
    instruct_rows: int | None,
    target,
    instruct_folder: Path,
    base_tokens: int | None,
    vocab_from: str | None,
) -> VocabPlan:
    """Step two, after ``check_target``: the layout, kept only when it differs from plain pairing."""
    if not vplan.names or not base_rows:
        return vplan
    target_rows = target.tensors[vplan.names[0]].shape[0]
    instruct_rows = instruct_rows or base_rows
    if base_tokens is None and target_rows == base_rows:
        t_count, i_count = token_count(target.path), token_count(instruct_folder)
        if t_count is None or i_count is None or t_count <= i_count:
            return vplan  # an older residual and a target that added no tokens: plain pairing
    layout = plan(
        base_rows=base_rows,
        target_rows=target_rows,
        instruct_rows=instruct_rows,
        target_folder=target.path,
        instruct_folder=instruct_folder,
        base_tokens=base_tokens,
        vocab_from=vocab_from,
    )
    if not is_plain(layout, instruct_rows):
        vplan.layout = layout
    return vplan


def summary_line(details: dict) -> str | None:
    """One line for the CLI from ``Result.details["vocabulary"]``; None when the vocabulary was plain."""
    summary = details.get("vocabulary")
    if not summary:
        return None
    line = (
        f"vocabulary: {summary['rows']} rows (base {summary['base_rows']}): {summary['residual_rows']} got the "
        f"residual, {summary['target_rows']} kept from the target, {summary['instruct_rows']} from the instruct "
        f"model; {len(summary['target_tokens_added'])} target token(s) added to the tokenizer"
    )
    if summary["dropped_tokens"]:
        line += "; left out: " + "; ".join(summary["dropped_tokens"])
    return line
