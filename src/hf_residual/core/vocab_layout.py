"""The vocabulary layout of a grown target: which output row comes from where, decided from tokenizers.

The rules are in ``vocab``'s docstring; this module reads token tables and builds the ``Layout`` (pure
data, no tensors); ``vocab`` turns it into engine jobs and output tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.errors import IncompatibleModelsError


def tokenizer_json(folder: Path) -> dict | None:
    path = Path(folder) / "tokenizer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def token_table(folder: Path) -> dict[int, str] | None:
    """id -> token string from ``tokenizer.json`` (model vocabulary and added tokens); None without one."""
    data = tokenizer_json(folder)
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
    data = tokenizer_json(target_folder) or {}
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
