"""Merge methods (``--method``): each against a plain float32 whole-tensor reference of its definition,
written here independently (numpy sort for the thresholds, Python integers for DARE's hash), bit for bit
after the one rounding, with engine blocks much smaller than the tensors."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import bits, load_tensors, matches

from hf_residual import api
from hf_residual.cli import main
from hf_residual.core import methods
from hf_residual.errors import ConfigError

M64 = (1 << 64) - 1


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().reshape(-1)


def kth_largest(values: np.ndarray, k: int) -> np.float32:
    return np.sort(np.abs(values))[::-1][k - 1]


def trim(x: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep |x| >= the k-th largest |x|, k = int(density * n); k = 0 keeps nothing."""
    if density >= 1:
        return x.copy()
    k = int(density * x.size)
    if k == 0:
        return np.zeros_like(x)
    return np.where(np.abs(x) >= kth_largest(x, k), x, np.float32(0))


def ties_reference(r: np.ndarray, d: np.ndarray, density: float) -> np.ndarray:
    """R's trimmed entries whose sign agrees with sign(trim(D) + trim(R)) (>= 0 elects +)."""
    tr, td = trim(r, density), trim(d, density)
    elected = tr + td
    keep = ((tr > 0) & (elected >= 0)) | ((tr < 0) & (elected < 0))
    return np.where(keep, r, np.float32(0))


def dare_mask(seed: int, name: str, p: float, n: int) -> np.ndarray:
    """splitmix64 in Python integers: kept where (mix(key + i * gamma) >> 11) >= int(p * 2**53)."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")
    limit = int(p * 2**53)
    keep = np.empty(n, bool)
    for i in range(n):
        z = (key + i * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        keep[i] = (z >> 11) >= limit
    return keep


def dare_reference(r: np.ndarray, name: str, p: float, seed: int) -> np.ndarray:
    return np.where(dare_mask(seed, name, p, r.size), r * np.float32(1.0 / (1.0 - p)), np.float32(0))


def orthogonal_reference(r: np.ndarray, d: np.ndarray) -> np.ndarray:
    """R - c * D, c = <R, D> / <D, D> from exact (Fraction) sums of the float64 products, rounded once to
    float64 and then to float32; the product and subtraction in float32."""
    num = sum(map(Fraction, (r.astype(np.float64) * d).tolist()), Fraction(0))
    den = sum(map(Fraction, (d.astype(np.float64) * d).tolist()), Fraction(0))
    c = np.float32(0) if den == 0 else np.float32(float(num / den))
    return r - c * d


def expected(family, method, alpha: float) -> dict[str, torch.Tensor]:
    """T + alpha * method(R), float32, one rounding; ``method(name, r, d)`` on whole flat tensors."""
    t, i, b = (load_tensors(p) for p in (family.cpt, family.instruct, family.base))
    out = {}
    for name in t:
        r = as_f32(i[name]) - as_f32(b[name])
        d = as_f32(t[name]) - as_f32(b[name])
        r = method(name, r, d)
        if alpha != 1.0:
            r = r * np.float32(alpha)
        out[name] = (t[name].float() + torch.from_numpy(r).reshape(t[name].shape)).to(t[name].dtype)
    return out


def assert_same(folder, want: dict[str, torch.Tensor]) -> None:
    got = load_tensors(folder)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(bits(got[name]), bits(want[name])), name


@pytest.fixture
def small_blocks(monkeypatch):
    from hf_residual.core import engine

    monkeypatch.setattr(engine, "DEFAULT_BLOCK", 1000)
    return 1000


@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ties_matches_reference(families, tmp_path, small_blocks, arch, density):
    family = families(arch, "bfloat16")
    spec = f"ties:density={density}"
    result = api.port(family.instruct, family.cpt, tmp_path / "o", base=family.base, alpha=0.9, method=spec)
    assert max(x.numel() for x in load_tensors(family.cpt).values()) > 4 * small_blocks
    want = expected(family, lambda n, r, d: ties_reference(r, d, density), 0.9)
    assert_same(result.output, want)
    assert result.details["method"] == spec
    assert f"merge method: `{spec}`" in (result.output / "README.md").read_text()
    # the method did something: some of R's entries were dropped
    assert not matches(result.output, expected(family, lambda n, r, d: r, 0.9))


def test_dare_matches_reference_and_drops_p(llama, tmp_path, small_blocks):
    p, seed = 0.4, 3
    spec = f"dare:p={p},seed={seed}"
    result = api.port(llama.instruct, llama.cpt, tmp_path / "o", base=llama.base, method=spec, progress=False)
    assert_same(result.output, expected(llama, lambda n, r, d: dare_reference(r, n, p, seed), 1.0))
    mask = np.concatenate([dare_mask(seed, n, p, x.numel()) for n, x in load_tensors(llama.base).items()])
    assert abs((~mask).mean() - p) < 4 * np.sqrt(p * (1 - p) / mask.size)  # binomial: 4 sigma
    other = api.port(llama.instruct, llama.cpt, tmp_path / "s", base=llama.base, method="dare:p=0.4,seed=4")
    assert not matches(other.output, load_tensors(result.output))  # the seed changes the mask


def test_block_size_does_not_change_the_result(llama, tmp_path, monkeypatch):
    from hf_residual.core import engine

    outs = []
    for block in (777, 1 << 18):
        monkeypatch.setattr(engine, "DEFAULT_BLOCK", block)
        folder = tmp_path / str(block)
        api.port(
            llama.instruct, llama.cpt, folder, base=llama.base, method="ties:density=0.3", progress=False
        )
        outs.append(load_tensors(folder))
    assert all(torch.equal(bits(outs[0][n]), bits(outs[1][n])) for n in outs[0])


def test_task_arithmetic_spec_is_the_default(llama, tmp_path):
    plain = api.port(llama.instruct, llama.cpt, tmp_path / "a", base=llama.base, alpha=0.8, progress=False)
    named = api.port(
        llama.instruct, llama.cpt, tmp_path / "b", base=llama.base, alpha=0.8, method="task_arithmetic"
    )
    assert matches(named.output, load_tensors(plain.output))
    assert_same(plain.output, expected(llama, lambda n, r, d: r, 0.8))


def test_apply_methods_equal_port(llama, tmp_path, small_blocks):
    residual = api.extract(llama.instruct, llama.base, tmp_path / "r", dtype="float32", progress=False)
    for spec in ("ties:density=0.3", "dare:p=0.5,seed=0"):
        port = api.port(
            llama.instruct, llama.cpt, tmp_path / spec, base=llama.base, method=spec, progress=False
        )
        applied = api.apply(
            residual.output,
            llama.cpt,
            tmp_path / f"a-{spec}",
            method=spec,
            base=llama.base if spec.startswith("ties") else None,  # dare needs no base
            progress=False,
        )
        assert matches(applied.output, load_tensors(port.output)), spec
    with pytest.raises(ConfigError, match=r"--base BASE"):
        api.apply(residual.output, llama.cpt, tmp_path / "x", method="ties:density=0.3", progress=False)
    assert not (tmp_path / "x").exists()


def test_dare_with_grown_vocabulary(families, tmp_path, small_blocks):
    """New vocabulary rows are copied from instruct; DARE drops only in the residual rows."""
    family = families("llama", "bfloat16", extra_instruct_tokens=8)
    result = api.port(
        family.instruct, family.cpt, tmp_path / "o", base=family.base, method="dare:p=0.5,seed=1"
    )
    t, i, b = (load_tensors(x) for x in (family.cpt, family.instruct, family.base))
    got = load_tensors(result.output)
    for name in t:
        rows = b[name].shape[0]
        r = as_f32(i[name][:rows]) - as_f32(b[name])
        want = t[name].float() + torch.from_numpy(dare_reference(r, name, 0.5, 1)).reshape(t[name].shape)
        assert torch.equal(bits(got[name][:rows]), bits(want.to(t[name].dtype))), name
        assert torch.equal(bits(got[name][rows:]), bits(i[name][rows:])), name


def test_radix_select_is_exact_on_adversarial_values():
    """The streamed two-pass select against a sort: ties at the threshold, zeros and -0.0, subnormals."""
    rng = np.random.default_rng(0)
    values = {
        "plus": np.concatenate(
            [
                np.repeat(np.float32([0.5, -0.5, 1e-40, -0.0, 0.0]), 300),
                rng.standard_normal(1000).astype(np.float32),
                np.float32([3.0, -3.0, 3.0000002]),
            ]
        ),
    }
    n = values["plus"].size
    values["base"] = np.zeros(n, np.float32)
    values["target"] = rng.permutation(values["plus"])
    segment = SimpleNamespace(start=0, stop=n, plus="plus", minus=None, addend="target")

    def decode(source, offset, count, out):
        out[:count] = values[source][offset : offset + count]

    for density in (0.001, 0.1, 0.2, 0.5, 0.9, 1.0):
        ties = methods.Ties("t", density, "base")
        for chunk in (61, 500, n):
            t_r, t_d = ties._thresholds(segment, chunk, decode)
            k = int(density * n)
            if density < 1:
                assert t_r == kth_largest(values["plus"], k) and t_d == kth_largest(values["target"], k)
            got = values["plus"].copy()  # R itself: no minus; D = target - 0
            fresh = methods.Ties("t", density, "base")
            for at in range(0, n, chunk):
                fresh.apply(got[at : at + chunk], segment, at, decode)
            want = ties_reference(values["plus"], values["target"] - values["base"], density)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (density, chunk)


def test_method_spec_errors():
    assert methods.parse_method("TIES:density=0.5").spec == "ties:density=0.5"
    assert methods.parse_method("dare:p=0.1").spec == "dare:p=0.1,seed=0"
    for spec, message in [
        ("slerp", "unknown merge method"),
        ("ties", "needs density"),
        ("ties:density=0", "in \\(0, 1\\]"),
        ("dare:p=1", "in \\[0, 1\\)"),
        ("dare:q=0.5", "takes p=..., seed=..."),
        ("ties:density=x", "must be a number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            methods.parse_method(spec)


def test_cli_method_json(llama, tmp_path, capsys):
    argv = ["port", str(llama.instruct), "--to", str(llama.cpt), "--base", str(llama.base)]
    argv += ["-o", str(tmp_path / "o"), "-q", "--method", "dare:p=0.2,seed=5", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "dare:p=0.2,seed=5" and data["alpha_for"] == []
    assert_same(tmp_path / "o", expected(llama, lambda n, r, d: dare_reference(r, n, 0.2, 5), 1.0))
    assert main([*argv[:-3], "--method", "ties"]) != 0
    assert "needs density" in capsys.readouterr().err


def test_orthogonal_matches_reference(families, tmp_path, small_blocks):
    family = families("qwen2", "bfloat16")
    result = api.port(
        family.instruct, family.cpt, tmp_path / "o", base=family.base, method="orthogonal", alpha=1.2
    )
    assert_same(result.output, expected(family, lambda n, r, d: orthogonal_reference(r, d), 1.2))
    residual = api.extract(family.instruct, family.base, tmp_path / "r", dtype="float32", progress=False)
    applied = api.apply(
        residual.output, family.cpt, tmp_path / "a", method="orthogonal", base=family.base, alpha=1.2
    )
    assert matches(applied.output, load_tensors(result.output))
    with pytest.raises(ConfigError, match=r"--base BASE"):
        api.apply(residual.output, family.cpt, tmp_path / "x", method="orthogonal", progress=False)


def test_exact_dot_is_exact():
    """The streamed exact dot product against Fractions, on values of very different scales."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32)
    y = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32)
    x[:10] = np.float32([1e-45, -1e-45, 0.0, -0.0, 3e38, -3e38, 1.0, 1.0, 2.0**-126, 0.5])
    dot = methods.ExactDot()
    for at in range(0, x.size, 777):
        dot.add(x[at : at + 777], y[at : at + 777])
    assert dot.value() == sum(map(Fraction, (x.astype(np.float64) * y).tolist()), Fraction(0))


def test_ties_on_a_compressed_residual(llama, tmp_path, small_blocks):
    """A lowrank residual read through its block readers (re-read by the threshold passes, digests still
    checked once): ties of the decoded R, against the reference on the decoded tensors."""
    from hf_residual.codecs.folders import decoded_tensors

    residual = api.extract(llama.instruct, llama.base, tmp_path / "r", codec="lowrank:8", progress=False)
    result = api.apply(residual.output, llama.cpt, tmp_path / "a", method="ties:density=0.4", base=llama.base)
    t, b = load_tensors(llama.cpt), load_tensors(llama.base)
    want = {}
    for name, r in decoded_tensors(residual.output):
        d = as_f32(t[name]) - as_f32(b[name])
        kept = torch.from_numpy(ties_reference(r.reshape(-1).astype(np.float32), d, 0.4))
        want[name] = (t[name].float() + kept.reshape(t[name].shape)).to(t[name].dtype)
    assert_same(result.output, want)
