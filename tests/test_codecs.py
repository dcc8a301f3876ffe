"""Codecs on their own: round trips on matrices with known spectra, sizes, seeds, bad specs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_residual.codecs import registry
from hf_residual.codecs.store import ShardWriter, as_stored, from_bf16_bits, read_tensor, round_bf16
from hf_residual.core.checkpoint import open_checkpoint
from hf_residual.core.manifest import read_manifest
from hf_residual.errors import ConfigError, ManifestError


def _matrix_with_spectrum(singular: list[float], shape=(48, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], len(singular))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], len(singular))))
    return (u * np.array(singular)) @ v.T


def _round_trip(spec: str, matrix: np.ndarray, name: str = "model.layers.0.mlp.up_proj.weight"):
    """Encode, store each part in its dtype, read back, decode: what a reader of the folder gets."""
    codec = registry.parse(spec)
    encoded = codec.encode(name, matrix.astype(np.float32))
    parts = {}
    for part, (dtype, array) in encoded.parts.items():
        stored = as_stored(dtype, array)
        parts[part] = from_bf16_bits(stored) if dtype == "BF16" else stored
    return encoded, codec.decode(matrix.shape, parts, encoded.params)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_lowrank_gives_back_a_rank_r_matrix_at_rank_r():
    matrix = _matrix_with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5])
    encoded, decoded = _round_trip("lowrank:5,dtype=float32", matrix)
    assert encoded.params["rank"] == 5
    assert encoded.parts["lora_A"][1].shape == (5, 40) and encoded.parts["lora_B"][1].shape == (48, 5)
    assert _rel(matrix, decoded) < 1e-5
    _, lower = _round_trip("lowrank:4,dtype=float32", matrix)
    # dropping the last singular value leaves exactly it as the error
    assert np.linalg.norm(matrix - lower) == pytest.approx(0.5, rel=1e-4)
    _, bf16 = _round_trip("lowrank:5", matrix)
    assert 1e-5 < _rel(matrix, bf16) < 1e-2


def test_lowrank_energy_picks_the_smallest_rank_holding_that_share():
    singular = [4.0, 2.0, 1.0, 1.0]  # squares 16, 4, 1, 1 of 22: 16/22 = .727, 20/22 = .909, 21/22 = .955
    matrix = _matrix_with_spectrum(singular)
    assert _round_trip("lowrank:energy=0.9", matrix)[0].params["rank"] == 2
    assert _round_trip("lowrank:energy=0.95", matrix)[0].params["rank"] == 3
    assert _round_trip("lowrank:energy=1.0", matrix)[0].params["rank"] == 4
    assert _round_trip("lowrank:energy=0.5", matrix)[0].params["rank"] == 1


def test_lowrank_rank_larger_than_the_matrix_is_refused():
    codec = registry.parse("lowrank:64")
    with pytest.raises(ConfigError, match="rank 64 is larger than tensor 'w' of shape \\[48, 40\\]"):
        codec.encode("w", np.zeros((48, 40), np.float32))


def test_lowrank_keeps_a_matrix_dense_when_its_factors_would_not_be_smaller():
    matrix = np.random.default_rng(5).standard_normal((48, 40)).astype(np.float32)
    assert registry.parse("lowrank:21").encode("w", matrix) is not None  # 21 * 88 * 2 < 48 * 40 * 2 bytes
    assert registry.parse("lowrank:22").encode("w", matrix) is None
    assert registry.parse("lowrank:11,dtype=float32").encode("w", matrix) is None  # 4-byte factors
    assert registry.parse("lowrank:energy=1.0").encode("w", matrix) is None  # full rank: dense


def test_bitdelta_stores_one_bit_per_element_and_mean_absolute_scale():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((30, 27)).astype(np.float32)
    encoded, decoded = _round_trip("bitdelta", matrix)
    assert encoded.parts["signs"][1].nbytes == -(-matrix.size // 8)
    assert encoded.params["scale"] == pytest.approx(float(np.abs(matrix).mean()), rel=1e-6)
    assert np.array_equal(np.sign(decoded), np.where(matrix >= 0, 1.0, -1.0))
    assert np.allclose(np.abs(decoded), encoded.params["scale"])
    # the error of sign * mean|x| for Gaussian data: sqrt(1 - 2/pi) = 0.60
    assert _rel(matrix, decoded) == pytest.approx(0.603, abs=0.05)
    signs_only = np.where(matrix >= 0, 0.25, -0.25).astype(np.float32)
    assert np.array_equal(_round_trip("bitdelta", signs_only)[1], signs_only)


def test_bitdelta_per_row_scales_fit_rows_of_different_sizes():
    rng = np.random.default_rng(4)
    row_sizes = np.array([0.01, 1.0, 5.0, 0.0], np.float32)[:, None]
    matrix = (rng.standard_normal((4, 64)) * row_sizes).astype(np.float32)
    encoded, decoded = _round_trip("bitdelta,scale=row", matrix)
    assert encoded.parts["scale"][1].shape == (4,) and encoded.params["scale"] == "row"
    assert np.allclose(np.abs(decoded), np.abs(matrix).mean(axis=1, keepdims=True), rtol=1e-6)
    assert np.array_equal(decoded[3], np.zeros(64, np.float32))  # a zero row stays zero
    _, one_scale = _round_trip("bitdelta", matrix)
    assert _rel(matrix, decoded) < 0.7 < _rel(matrix, one_scale)


def test_dare_is_seeded_reproducible_and_rescaled():
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((100, 100)).astype(np.float32)
    first, decoded = _round_trip("sparse:0.2,dtype=float32", matrix)
    again, decoded_again = _round_trip("sparse:0.2,dtype=float32", matrix)
    other, decoded_other = _round_trip("sparse:0.2,seed=7,dtype=float32", matrix)
    assert np.array_equal(decoded, decoded_again) and first.params["seed"] == again.params["seed"]
    assert not np.array_equal(decoded, decoded_other) and other.params["seed"] != first.params["seed"]
    kept = decoded != 0
    assert first.params["kept"] == int(kept.sum())
    assert abs(kept.mean() - 0.2) < 0.02
    assert np.allclose(decoded[kept], matrix[kept] / np.float32(0.2))
    # compact layout: a gap per kept value in one byte, values in float32
    assert first.parts["gaps"][0] == "U8" and first.parts["values"][1].size == first.params["kept"]


def test_topk_keeps_the_largest_magnitudes_unscaled():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((50, 40)).astype(np.float32)
    encoded, decoded = _round_trip("sparse:topk=0.1", matrix)
    assert encoded.params["kept"] == 200 and np.count_nonzero(decoded) == 200
    threshold = np.sort(np.abs(matrix).ravel())[-200]
    assert np.all(np.abs(matrix[decoded != 0]) >= threshold)
    assert np.array_equal(decoded[decoded != 0], round_bf16(matrix[decoded != 0]))
    size = sum(as_stored(dtype, array).nbytes for dtype, array in encoded.parts.values())
    assert size == 200 * (1 + 2)  # uint8 gaps + bfloat16 values


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zstd:3", "unknown codec 'zstd:3'"),
        ("lowrank", "give a rank"),
        ("lowrank:0", "rank must be at least 1"),
        ("lowrank:abc", "rank must be a whole number"),
        ("lowrank:8,energy=0.9", "give a rank"),
        ("lowrank:energy=1.5", r"energy must be in \(0.0, 1.0\]"),
        ("lowrank:8,dtype=int4", "dtype must be bfloat16 or float32"),
        ("sparse:1.5", r"density must be in \(0.0, 1.0\]"),
        ("sparse:0", r"density must be in \(0.0, 1.0\]"),
        ("sparse:0.1,seed=x", "seed must be a whole number"),
        ("sparse:topk=0.1,seed=3", "seed only applies to DARE"),
        ("bitdelta:3", "bitdelta takes no value"),
        ("bitdelta,bits=2", "unknown parameter"),
        ("bitdelta,scale=column", "scale must be matrix or row"),
        ("sparse:0.1,embeddings=maybe", "embeddings must be dense or compress"),
    ],
)
def test_bad_codec_specs_are_refused_with_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        registry.parse(spec)


def test_dense_names_are_the_engine_dtypes():
    assert registry.dense_dtype("lossless") == "float32"
    assert registry.dense_dtype("BF16") == "bfloat16"
    assert registry.dense_dtype("lowrank:8") is None


def test_which_tensors_are_encoded():
    codec = registry.parse("bitdelta")
    assert codec.compresses("model.layers.0.self_attn.q_proj.weight", (8, 8), None)
    assert not codec.compresses("model.norm.weight", (8,), None)
    assert not codec.compresses("model.embed_tokens.weight", (300, 8), None)
    assert not codec.compresses("model.layers.0.self_attn.q_proj.weight", (8, 8), 4)
    assert registry.parse("bitdelta,embeddings=compress").compresses("lm_head.weight", (300, 8), None)


def test_shard_writer_streams_shards_that_read_back(tmp_path):
    writer = ShardWriter(tmp_path, "residual", max_bytes=100)
    arrays = {f"t{i}": np.arange(i * 10, i * 10 + 12, dtype=np.float32) for i in range(4)}
    for name, array in arrays.items():
        writer.add(name, "F32", array)
    writer.add("b", "BF16", as_stored("BF16", np.array([1.5, -2.0], np.float32)))
    names = writer.close()
    assert len(names) == 2 and (tmp_path / "residual.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".residual-data-*"))
    tensors = open_checkpoint(tmp_path, prefix="residual").tensors
    for name, array in arrays.items():
        assert np.array_equal(read_tensor(tensors[name]), array)
    assert read_tensor(tensors["b"]).tolist() == [1.5, -2.0]


def test_manifest_with_an_unknown_codec_names_the_version_needed(tmp_path):
    manifest = {
        "format": "hf-residual",
        "format_version": 1,
        "codec": "vq:256",
        "tool_version": "0.9.0",
        "tensors": {},
        "base": {"name": "b"},
        "instruct": {"name": "i"},
    }
    (tmp_path / "residual.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"codec 'vq:256' is unknown.*hf-residual 0.9.0: upgrade"):
        read_manifest(tmp_path)
    manifest["codec"] = "bitdelta"
    (tmp_path / "residual.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path).codec == "bitdelta"
