"""Recipes (``hf_residual.ops.recipe.Recipe``, ``port --recipe``): a YAML round trip that keeps every
bit, and ``--recipe`` giving the same model as the same flags."""

from __future__ import annotations

import json

import pytest
from helpers import load_tensors, matches

from hf_residual import api
from hf_residual.cli import main
from hf_residual.errors import ConfigError
from hf_residual.ops.recipe import Recipe

RULES = {r"embed_tokens|lm_head": 0.1 + 0.2, r"layers\.0\.self_attn": 1.1}  # 0.30000000000000004: repr kept


def test_round_trip_keeps_every_bit_and_order(tmp_path):
    recipe = Recipe(
        alpha=0.7 + 0.1, alpha_for=RULES, method="dare:p=0.25,seed=7", notes={"score": [0.5, 0.25]}
    )
    path = recipe.save(tmp_path / "recipe.yaml")
    loaded = Recipe.load(path)
    assert loaded == recipe
    assert list(loaded.alpha_for) == list(RULES)  # order is meaning: first match wins
    assert loaded.port_kwargs() == {"alpha": 0.7 + 0.1, "alpha_for": RULES, "method": "dare:p=0.25,seed=7"}
    assert "hf_residual_recipe: 1" in path.read_text()


def test_hand_written_recipe_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("alpha: 1.2\nmethod: ties:density=0.5\nalpha_for:\n  lm_head: 0.0\n")
    assert Recipe.load(path).port_kwargs() == {
        "alpha": 1.2,
        "alpha_for": {"lm_head": 0.0},
        "method": "ties:density=0.5",
    }
    path.write_text("alpha: 1\nalfa_for: {}\n")
    with pytest.raises(ConfigError, match="unknown keys \\['alfa_for'\\]"):
        Recipe.load(path)
    path.write_text("method: ties\n")
    with pytest.raises(ConfigError, match="needs density"):
        Recipe.load(path)
    with pytest.raises(ConfigError, match="not found"):
        Recipe.load(tmp_path / "missing.yaml")


def port_argv(family, out) -> list[str]:
    return [
        "port",
        str(family.instruct),
        "--to",
        str(family.cpt),
        "--base",
        str(family.base),
        "-o",
        str(out),
        "-q",
    ]


def test_port_recipe_equals_flags_bit_for_bit(llama, tmp_path, capsys):
    recipe = Recipe(alpha=0.8, alpha_for=RULES, method="dare:p=0.3,seed=1")
    path = recipe.save(tmp_path / "recipe.yaml")
    flags = ["--alpha", "0.8", "--method", "dare:p=0.3,seed=1"]
    for pattern, alpha in RULES.items():
        flags += ["--alpha-for", f"{pattern}={alpha!r}"]
    assert main([*port_argv(llama, tmp_path / "flags"), *flags]) == 0
    capsys.readouterr()
    assert main([*port_argv(llama, tmp_path / "recipe"), "--recipe", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "dare:p=0.3,seed=1" and data["alpha"] == 0.8
    assert matches(tmp_path / "recipe", load_tensors(tmp_path / "flags"))
    api_out = api.port(
        llama.instruct, llama.cpt, tmp_path / "api", base=llama.base, progress=False, **recipe.port_kwargs()
    )
    assert matches(api_out.output, load_tensors(tmp_path / "flags"))
    # the flags' own effect: a plain port differs
    assert not matches(
        api.port(llama.instruct, llama.cpt, tmp_path / "plain", base=llama.base, progress=False).output,
        load_tensors(tmp_path / "flags"),
    )


def test_flags_override_recipe(llama, tmp_path, capsys):
    path = Recipe(alpha=0.8, alpha_for={"lm_head": 0.5}, method="dare:p=0.3,seed=1").save(tmp_path / "r.yaml")
    argv = [
        *port_argv(llama, tmp_path / "o"),
        "--recipe",
        str(path),
        "--alpha",
        "1.1",
        "--method",
        "task_arithmetic",
    ]
    assert main([*argv, "--alpha-for", "lm_head|embed=0.2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["alpha"] == 1.1 and data["method"] == "task_arithmetic"
    assert [(r["pattern"], r["alpha"]) for r in data["alpha_for"]] == [
        ("lm_head|embed", 0.2),
        ("lm_head", 0.5),
    ]


def test_apply_recipe(llama, tmp_path):
    residual = api.extract(llama.instruct, llama.base, tmp_path / "r", dtype="float32", progress=False)
    path = Recipe(alpha=0.9, alpha_for=RULES).save(tmp_path / "r.yaml")
    argv = ["apply", str(residual.output), "--to", str(llama.cpt), "-o", str(tmp_path / "a"), "-q"]
    assert main([*argv, "--recipe", str(path)]) == 0
    ported = api.port(
        llama.instruct, llama.cpt, tmp_path / "p", base=llama.base, progress=False, alpha=0.9, alpha_for=RULES
    )
    assert matches(tmp_path / "a", load_tensors(ported.output))


def test_readme_forms():
    """README's API form (``hf_residual.Recipe``) and its --alpha-for examples parse as documented."""
    import hf_residual
    from hf_residual.core.methods import parse_alpha_for

    assert hf_residual.Recipe is Recipe
    items = ["embed_tokens|lm_head=0.5", r"layers\.(2[4-9]|3[01])\.=1.2", "(?=x)y=2"]
    assert parse_alpha_for(items) == {
        "embed_tokens|lm_head": 0.5,
        r"layers\.(2[4-9]|3[01])\.": 1.2,
        "(?=x)y": 2.0,
    }
