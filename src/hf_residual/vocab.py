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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.engine import Segment, Source, TensorJob
from hf_residual.errors import ConfigError, IncompatibleModelsError, VerificationError
from hf_residual.safetensors_io import OutputTensor, TensorInfo

VOCAB_FROM = ("target", "instruct")
LAYOUT_FILE = "vocabulary_rows.json"


def check_vocab_from(value: str | None) -> str | None:
    if value is not None and value not in VOCAB_FROM:
        raise ConfigError(f"vocab_from must be 'target' or 'instruct', got {value!r}")
    return value


def _tokenizer_json(folder: Path) -> dict | None:
    path = Path(folder) / "tokenizer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def token_table(folder: Path) -> dict[int, str] | None:
    """id -> token string from ``tokenizer.json`` (model vocabulary and added tokens); None without one."""
    data = _tokenizer_json(folder)
    if data is None:
        return None
    table: dict[int, str] = {}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        table.update({int(i): s for s, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        table.update({i: entry[0] for i, entry in enumerate(vocab)})
    for entry in data.get("added_tokens") or []:
        table[int(entry["id"])] = entry["content"]
    return table


def token_count(folder: Path) -> int | None:
    table = token_table(folder)
    return None if table is None else max(table, default=-1) + 1


@dataclass
class Layout:
    """Where each output row comes from: runs ``(start, stop, kind)``, kind residual/target/instruct."""

    rows: int
    base_rows: int
    runs: list[tuple[int, int, str]]
    added: dict[int, dict] = field(default_factory=dict)  # target tokens the output adds (id -> entry)
    dropped: list[str] = field(default_factory=list)  # tokens left out by vocab_from, described

    def rows_of(self, kind: str) -> int:
        return sum(stop - start for start, stop, k in self.runs if k == kind)

    def summary(self) -> dict:
        return {
            "rows": self.rows,
            "base_rows": self.base_rows,
            "runs": [{"start": a, "stop": b, "rows": kind} for a, b, kind in self.runs],
            "residual_rows": self.rows_of("residual"),
            "target_rows": self.rows_of("target"),
            "instruct_rows": self.rows_of("instruct"),
            "target_tokens_added": {str(i): e["content"] for i, e in sorted(self.added.items())},
            "dropped_tokens": list(self.dropped),
        }

    def describe(self) -> str:
        """One paragraph for the model card."""

        def spans(kind: str) -> str:
            found = [f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b, k in self.runs if k == kind]
            return ", ".join(found) or "none"

        text = (
            f"Vocabulary: {self.rows} embedding rows (the base has {self.base_rows}). Rows that got the "
            f"residual: {spans('residual')}; the target's rows kept as they are: {spans('target')}; the "
            f"instruct model's rows: {spans('instruct')}."
        )
        if self.added:
            text += f" Tokens added by the target: {len(self.added)}."
        if self.dropped:
            text += " Left out (--vocab-from): " + "; ".join(self.dropped) + "."
        return text


def _runs(kinds: list[str]) -> list[tuple[int, int, str]]:
    runs: list[tuple[int, int, str]] = []
    for row, kind in enumerate(kinds):
        if runs and runs[-1][2] == kind and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1, kind)
        else:
            runs.append((row, row + 1, kind))
    return runs


def _preview(items: list[str]) -> str:
    return "; ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def plan(
    *,
    base_rows: int,
    target_rows: int,
    instruct_rows: int,
    target_folder: Path,
    instruct_folder: Path,
    base_tokens: int | None,
    vocab_from: str | None,
) -> Layout:
    """The output's rows and tokens; raises ``IncompatibleModelsError`` on a token conflict."""
    if target_rows < base_rows:
        raise IncompatibleModelsError(
            f"the target has {target_rows} vocabulary rows, fewer than the base's {base_rows}: a target may "
            "add tokens (resize_token_embeddings) but not remove them"
        )
    target_tokens = token_table(target_folder) or {}
    instruct_tokens = token_table(instruct_folder) or {}
    if base_tokens is None and target_tokens and instruct_tokens:
        # an older residual (or a base without tokenizer.json): the first id where the tokenizers differ
        base_tokens = next(
            (i for i in sorted(target_tokens) if instruct_tokens.get(i) != target_tokens[i]),
            len(target_tokens),
        )
    elif base_tokens is None:  # one side has no tokenizer.json: only rows beyond the base's are new
        base_tokens = base_rows
    new = {i: s for i, s in target_tokens.items() if i >= base_tokens}
    instruct_ids = {s: i for i, s in instruct_tokens.items()}
    by_id = [
        f"id {i}: {s!r} in the target, {instruct_tokens[i]!r} in the instruct model"
        for i, s in sorted(new.items())
        if instruct_tokens.get(i) not in (None, s)
    ]
    by_string = [
        f"{s!r}: id {i} in the target, id {instruct_ids[s]} in the instruct model"
        for i, s in sorted(new.items())
        if instruct_ids.get(s, i) != i
    ]
    if (by_id or by_string) and vocab_from is None:
        parts = []
        if by_id:
            parts.append(f"{len(by_id)} id(s) mean different tokens ({_preview(by_id)})")
        if by_string:
            parts.append(f"{len(by_string)} token(s) have different ids ({_preview(by_string)})")
        raise IncompatibleModelsError(
            "the target and the instruct model both added tokens, and they clash: "
            + "; ".join(parts)
            + ". The output cannot hold both at these ids. Choose whose token (and embedding row) wins at "
            "each clash: --vocab-from target (the instruct's clashing tokens are left out of the tokenizer; "
            "the chat template may then need them) or --vocab-from instruct (the target's clashing tokens are "
            "left out), or re-add one side's tokens without the clash (e.g. train the target from a "
            "tokenizer that already holds the instruct model's chat tokens)"
        )
    dropped: list[str] = []
    keep_target: dict[int, str] = {}
    for i, s in sorted(new.items()):
        clash = instruct_tokens.get(i) not in (None, s) or instruct_ids.get(s, i) != i
        if clash and vocab_from == "instruct":
            dropped.append(f"target {s!r} (id {i})")
        else:
            keep_target[i] = s
            if clash:
                other = instruct_tokens.get(i)
                if other not in (None, s):
                    dropped.append(f"instruct {other!r} (id {i})")
                if instruct_ids.get(s, i) != i:
                    dropped.append(f"instruct {s!r} (id {instruct_ids[s]})")
    rows = max(target_rows, instruct_rows)
    kinds = []
    for row in range(rows):
        target_only = row in keep_target and instruct_tokens.get(row) != keep_target[row]
        if target_only or row >= instruct_rows:
            kinds.append("target")
        elif row < base_rows:
            kinds.append("residual")
        else:
            kinds.append("instruct")
    if any(i >= target_rows for i in keep_target):
        raise IncompatibleModelsError(
            f"the target's tokenizer has ids up to {max(keep_target)} but its embedding has {target_rows} rows; "
            "resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))"
        )
    data = _tokenizer_json(target_folder) or {}
    entries = {int(e["id"]): e for e in data.get("added_tokens") or []}
    added = {
        i: entries.get(i, _plain_entry(i, s)) for i, s in keep_target.items() if instruct_tokens.get(i) != s
    }
    return Layout(rows, base_rows, _runs(kinds), added, dropped)


def _plain_entry(i: int, s: str) -> dict:
    return {
        "id": i,
        "content": s,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": False,
    }


def is_plain(layout: Layout, instruct_rows: int) -> bool:
    """True when the layout is what plain pairing gives: residual below ``B``, instruct rows above."""
    expected = _runs(["residual" if r < layout.base_rows else "instruct" for r in range(instruct_rows)])
    return (
        layout.rows == instruct_rows and layout.runs == expected and not layout.added and not layout.dropped
    )


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
    data = _tokenizer_json(staging)
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
