"""Per-tensor alpha (``alpha_for`` / ``--alpha-for``): first match wins, exact against an independent
float32 reference, recorded in the details and the card, still on the fused kernels."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import bits, load_tensors, reference_port

from hf_residual import api
from hf_residual.cli import main
from hf_residual.errors import ConfigError

RULES = {r"embed_tokens|lm_head": 0.5, r"layers\.1\.": 1.25, r"layers\.1\.mlp": 3.0}


def expected_alpha(name: str, rules: dict[str, float], default: float) -> float:
    """Written here, independently: the first pattern (in order) that re.search-es the name."""
    return next((a for p, a in rules.items() if re.search(p, name)), default)


def reference(family, rules: dict[str, float], default: float) -> dict[str, torch.Tensor]:
    t, i, b = (load_tensors(p) for p in (family.cpt, family.instruct, family.base))
    return {n: reference_port(t[n], i[n], b[n], expected_alpha(n, rules, default)) for n in t}


def expected_counts(family, rules: dict[str, float]) -> list[int]:
    """How many of the family's tensors each pattern sets (first match wins), counted here."""
    counts = dict.fromkeys(rules, 0)
    for name in load_tensors(family.base):
        winner = next((p for p in rules if re.search(p, name)), None)
        if winner is not None:
            counts[winner] += 1
    return list(counts.values())


def assert_same(folder, expected: dict[str, torch.Tensor]) -> None:
    got = load_tensors(folder)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(bits(got[name]), bits(expected[name])), name


@pytest.fixture
def fused_spy(monkeypatch):
    """The kernels the engine picked: alpha_for keeps task_arithmetic on the fused kernels."""
    from hf_residual.core import engine

    chosen = []
    choose = engine._fused_kernel

    def spy(*args, **kwargs):
        chosen.append(choose(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(engine, "_fused_kernel", spy)
    return chosen


def test_port_alpha_for_matches_reference_first_match_wins(llama, tmp_path, fused_spy):
    result = api.port(
        llama.instruct,
        llama.cpt,
        tmp_path / "out",
        base=llama.base,
        alpha=0.75,
        alpha_for=RULES,
        progress=False,
    )
    assert_same(result.output, reference(llama, RULES, 0.75))
    assert fused_spy and all(k is not None for k in fused_spy)  # per-segment alpha: fused kernels kept
    counts = expected_counts(llama, RULES)
    assert counts[0] >= 1 and counts[1] >= 9 and counts[2] == 0  # layers.1.mlp: taken by layers.1. first
    table = [(row["pattern"], row["alpha"], row["tensors"]) for row in result.details["alpha_for"]]
    assert table == [(p, a, c) for (p, a), c in zip(RULES.items(), counts, strict=True)]
    assert result.details["method"] == "task_arithmetic"
    card = (result.output / "README.md").read_text()
    assert f"| `embed_tokens\\|lm_head` | 0.5 | {counts[0]} |" in card
    assert f"| `layers\\.1\\.` | 1.25 | {counts[1]} |" in card


def test_alpha_for_unset_is_unchanged(llama, tmp_path):
    """No alpha_for: the reference of plain T + alpha * R, an empty table, the card without one."""
    result = api.port(
        llama.instruct, llama.cpt, tmp_path / "out", base=llama.base, alpha=0.75, progress=False
    )
    assert_same(result.output, reference(llama, {}, 0.75))
    assert result.details["alpha_for"] == [] and result.details["method"] == "task_arithmetic"
    card = (result.output / "README.md").read_text()
    assert "Per-tensor alpha" not in card and "merge method" not in card


def test_apply_alpha_for_equals_port(llama, tmp_path):
    residual = api.extract(llama.instruct, llama.base, tmp_path / "r", dtype="float32", progress=False)
    applied = api.apply(
        residual.output, llama.cpt, tmp_path / "a", alpha=0.75, alpha_for=RULES, progress=False
    )
    assert_same(applied.output, reference(llama, RULES, 0.75))
    assert [row["tensors"] for row in applied.details["alpha_for"]] == expected_counts(llama, RULES)


def test_unmatched_pattern_and_bad_regex_are_errors(llama, tmp_path):
    with pytest.raises(ConfigError, match=r"'layer\\\\.1\\\\.' matches no tensor name \(a typo\?\)"):
        api.port(
            llama.instruct,
            llama.cpt,
            tmp_path / "o",
            base=llama.base,
            alpha_for={r"layer\.1\.": 2.0},
            progress=False,
        )
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        api.port(
            llama.instruct, llama.cpt, tmp_path / "o", base=llama.base, alpha_for={"(": 2.0}, progress=False
        )
    assert not (tmp_path / "o").exists()


def test_cli_alpha_for_json(llama, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["port", str(llama.instruct), "--to", str(llama.cpt), "--base", str(llama.base), "-o", str(out)]
    argv += ["--alpha", "0.75", "-q", "--json"]
    for pattern, alpha in RULES.items():
        argv += ["--alpha-for", f"{pattern}={alpha}"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "task_arithmetic" and data["alpha"] == 0.75
    assert [(r["pattern"], r["alpha"]) for r in data["alpha_for"]] == list(RULES.items())
    assert_same(out, reference(llama, RULES, 0.75))


def test_cli_alpha_for_bad_item(llama, tmp_path, capsys):
    argv = [
        "port",
        str(llama.instruct),
        "--to",
        str(llama.cpt),
        "-o",
        str(tmp_path / "x"),
        "--alpha-for",
        "0.5",
    ]
    assert main(argv) != 0
    assert "PATTERN=VALUE" in capsys.readouterr().err
