"""Streamed encoding (``codecs.encode_stream``) writes the bytes the whole-tensor encoders write, bit for bit.

The reference is the whole-tensor path (``folders._encode_whole``, what every tensor went through before
encoders streamed and what lowrank and top-k still use), selected by making ``streams`` refuse every
codec. Chunks of 8192 elements and engine blocks of 40 elements (mid-row: rows of 48) make every tensor
of the toy families span several blocks and the embeddings several chunks, with rows across chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_residual import api
from hf_residual.codecs import encode_stream, fidelity
from hf_residual.codecs import exact as codec_exact
from hf_residual.codecs.store import ShardWriter
from hf_residual.core.manifest import read_manifest

CHUNK = 8192


@pytest.fixture(scope="module")
def toy(families):
    return {
        "plain": families("llama", "float32", hidden=48, vocab_size=400),  # sums that round
        "grown": families("llama", hidden=48, vocab_size=400, extra_instruct_tokens=3),
    }


def _extract(family, out, spec: str, monkeypatch, streamed: bool) -> int:
    """Extract with ``spec``; return how many tensors were computed whole (``ExactTensor.values``)."""
    whole = []
    values = codec_exact.ExactTensor.values
    with monkeypatch.context() as m:
        m.setattr(fidelity, "CHUNK", CHUNK)
        m.setattr(codec_exact, "DEFAULT_BLOCK", 40)
        m.setattr(codec_exact.ExactTensor, "values", lambda self: whole.append(self.name) or values(self))
        if not streamed:
            m.setattr(encode_stream, "streams", lambda codec: False)
        api.extract(family.instruct, family.base, out, codec=spec, max_shard_size="2KB", progress=False)
    return len(whole)


@pytest.mark.parametrize(
    ("family", "spec", "whole"),
    [
        ("grown", "bitdelta", 0),  # embeddings and LM head dense, their new rows absolute (two segments)
        ("plain", "bitdelta,embeddings=compress", 0),
        ("plain", "bitdelta,scale=row,embeddings=compress", 0),
        ("plain", "sparse:0.3,embeddings=compress", 0),
        ("grown", "sparse:0.05,dtype=float32,seed=4", 0),
        ("plain", "sparse:topk=0.2", 14),  # whole: a global top-k (the 14 matrices of 2 layers)
        ("grown", "lowrank:4", 14),  # whole: an SVD; the rest streams
    ],
)
def test_streamed_extract_writes_the_bytes_of_the_whole_tensor_path(
    toy, tmp_path, monkeypatch, family, spec, whole
):
    streamed, reference = tmp_path / "streamed", tmp_path / "whole"
    assert _extract(toy[family], streamed, spec, monkeypatch, streamed=True) == whole
    assert _extract(toy[family], reference, spec, monkeypatch, streamed=False) > whole
    manifest = read_manifest(streamed)
    assert max(np.prod(e.shape) for e in manifest.tensors.values()) > 2 * CHUNK  # the embedding: 3 chunks
    assert len(list(streamed.glob("residual-*.safetensors"))) > 1  # tensors begun across shards
    names = sorted(p.name for p in streamed.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        assert (streamed / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("seed", range(6))
def test_sums_of_abs_equal_numpy_mean_over_any_chunks(seed):
    """``_AbsSum``/``_RowMeans`` fed in chunks equal ``np.mean(np.abs(R), dtype=float64)`` bit for bit
    (heavy-tailed values, so a different order of additions would show in the last bits)."""
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 90)), int(rng.integers(1, 3000))
    matrix = (rng.standard_normal((rows, cols)) * np.exp(3 * rng.standard_normal((rows, cols)))).astype(
        np.float32
    )
    chunk = 8192 * int(rng.integers(1, 4))
    total, means = encode_stream._AbsSum(), encode_stream._RowMeans(rows, cols)
    for values in encode_stream.ArrayTensor("t", matrix).chunks(chunk):
        total.add(values)
        means.add(values)
    assert total.total / matrix.size == np.mean(np.abs(matrix), dtype=np.float64)
    assert means.done == rows
    assert np.array_equal(means.means, np.mean(np.abs(matrix), axis=1, dtype=np.float64))


def test_chunks_are_the_documented_size():
    """docs/CODECS.md: chunks of 2^20 elements (4 MiB of float32): the memory a streamed encoder holds."""
    assert fidelity.CHUNK == 1 << 20


def test_shard_writer_refuses_a_streamed_tensor_of_the_wrong_size(tmp_path):
    writer = ShardWriter(tmp_path, "residual", 10**6)
    writer.begin("a", "U8", (4,))
    writer.write(np.zeros(3, np.uint8))
    with pytest.raises(RuntimeError, match="3 bytes written, its shape takes 4"):
        writer.end()
