"""Compressed residuals applied in the stream (issue 14 §3), against an independent whole-tensor reference.

The reference decodes each stored part with safetensors + numpy over the whole tensor (not the codec's
code): bitdelta ``where(bit, s, -s)``, sparse ``values`` at ``cumsum(gaps) - 1``, lowrank ``B @ A`` in
float64 rounded once to float32 (the contract: see ``codecs.lowrank.product``), dense bfloat16 widened;
then ``T + alpha * R`` in float32, rounded once to the target's dtype. The engine runs with a block of
997 elements, so blocks start and stop mid-row, and mid-byte in bitdelta's packed signs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bits, load_tensors
from safetensors.torch import load_file

from hf_residual import api
from hf_residual.codecs import stream
from hf_residual.codecs.folders import encode_folder
from hf_residual.core import engine, fused
from hf_residual.core.jobs import is_decoded
from hf_residual.core.safetensors_io import read_header
from hf_residual.errors import VerificationError

ALPHA = 0.7
SPECS = [
    "lowrank:4",
    "lowrank:4,dtype=float32,embeddings=compress",
    "bitdelta",
    "bitdelta,scale=row,embeddings=compress",
    "sparse:0.3,seed=2",
    "sparse:topk=0.1,dtype=float32,embeddings=compress",
]


def _stored(folder: Path) -> dict[str, np.ndarray]:
    """Every stored part, read by the safetensors library (bfloat16 as its uint16 bits)."""
    out = {}
    for file in sorted(folder.glob("residual*.safetensors")):
        for name, tensor in load_file(file).items():
            if tensor.dtype == torch.bfloat16:
                out[name] = tensor.view(torch.int16).numpy().view(np.uint16)
            else:
                out[name] = tensor.numpy()
    return out


def _float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:  # bfloat16 bits
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _reference_residual(folder: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "residual.json").read_text())
    stored = _stored(folder)
    out = {}
    for name, entry in manifest["tensors"].items():
        shape, info = tuple(entry["shape"]), entry["codec"]
        kind = info["kind"]
        if kind == "dense":
            values = _float(stored[name])
        elif kind == "bitdelta":
            n = int(np.prod(shape))
            positive = np.unpackbits(stored[f"{name}.signs"])[:n].reshape(shape) == 1
            scale = _float(stored[f"{name}.scale"])
            scale = scale[:, None] if info.get("scale") == "row" else scale[0]
            values = np.where(positive, scale, -scale).astype(np.float32)
        elif kind == "sparse":
            values = np.zeros(int(np.prod(shape)), np.float32)
            values[np.cumsum(stored[f"{name}.gaps"].astype(np.int64)) - 1] = _float(stored[f"{name}.values"])
        else:
            b, a = (_float(stored[f"{name}.{p}"]).astype(np.float64) for p in ("lora_B", "lora_A"))
            values = (b @ a).astype(np.float32)
        out[name] = values.reshape(shape)
    return out


def _expected(target: Path, residual: Path, alpha: float) -> dict[str, torch.Tensor]:
    t = load_tensors(target)
    r = _reference_residual(residual)
    assert r.keys() == t.keys()
    return {n: (t[n].float() + alpha * torch.from_numpy(r[n])).to(t[n].dtype) for n in t}


class Watch:
    """Polls folders during a run: every entry that appears, and whether the output's staging was seen."""

    def __init__(self, *folders: Path) -> None:
        self.folders, self.seen, self.stop = folders, set(), threading.Event()
        self.before = {f: set(f.iterdir()) for f in folders}
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            for folder in self.folders:
                self.seen.update(p for p in folder.iterdir() if p not in self.before[folder])

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(engine, "DEFAULT_BLOCK", 997)  # prime: blocks start mid-row and mid-byte


@pytest.fixture(scope="module")
def residuals(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for spec in SPECS:
        out[spec] = root / spec.replace(":", "-").replace(",", "_").replace("=", "-")
        api.extract(llama.instruct, llama.base, out[spec], codec=spec, max_shard_size="20KB", progress=False)
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_port_from_a_compressed_residual_equals_the_whole_tensor_reference_bit_for_bit(
    llama, residuals, spec, tmp_path, monkeypatch, small_blocks
):
    kinds = {
        e["codec"]["kind"]
        for e in json.loads((residuals[spec] / "residual.json").read_text())["tensors"].values()
    }
    assert kinds == {"dense", spec.split(":")[0].split(",")[0]}  # both kinds of tensor in every run
    tmpdir = tmp_path / "system-tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    parent = tmp_path / "models"
    parent.mkdir()
    with Watch(parent, tmpdir) as watch:
        api.port(residuals[spec], llama.cpt, parent / "ported", alpha=ALPHA, progress=False)
    assert any(p.name.startswith(".ported.partial-") for p in watch.seen), "the watch missed the run"
    strays = [p.name for p in watch.seen if p.name != "ported" and not p.name.startswith(".ported.partial-")]
    assert strays == [], f"temporary files or folders appeared during the port: {strays}"
    got = load_tensors(parent / "ported")
    expected = _expected(llama.cpt, residuals[spec], ALPHA)
    for name, values in expected.items():
        assert torch.equal(bits(got[name]), bits(values)), (spec, name)


def test_extract_with_a_codec_writes_no_float32_folder_and_encodes_the_exact_residual(
    llama, tmp_path, monkeypatch
):
    """No folder but the output's staging appears, the probe included; the parts equal those encoded from
    a float32 residual folder (the exact values are the engine's)."""
    parent = tmp_path / "models"
    parent.mkdir()
    tmpdir = tmp_path / "system-tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    with Watch(parent, tmpdir) as watch:
        api.extract(llama.instruct, llama.base, parent / "r", codec="sparse:0.3", probe=True, progress=False)
    strays = [p.name for p in watch.seen if p.name != "r" and not p.name.startswith(".r.partial-")]
    assert strays == [] and any(p.name.startswith(".r.partial-") for p in watch.seen), watch.seen
    exact = api.extract(llama.instruct, llama.base, tmp_path / "exact", dtype="float32", progress=False)
    from hf_residual.codecs import registry

    (tmp_path / "old").mkdir()
    encode_folder(exact.output, tmp_path / "old", registry.parse("sparse:0.3"), 5 * 10**9)
    new, old = _stored(parent / "r"), _stored(tmp_path / "old")
    assert new.keys() == old.keys()
    assert all(np.array_equal(new[n], old[n]) for n in new)
    entries = json.loads((parent / "r" / "residual.json").read_text())["tensors"]
    olds = json.loads((tmp_path / "old" / "residual.json").read_text())["tensors"]
    for name, entry in entries.items():  # norms as the engine measured them
        assert entry["residual_norm"] == pytest.approx(olds[name]["residual_norm"], rel=1e-12), name
        assert entry["sha256"] == olds[name]["sha256"]


def _flip_bit(folder: Path, stored_name: str, byte: int = 3) -> None:
    for file in folder.glob("residual*.safetensors"):
        header, _ = read_header(file)
        if stored_name in header:
            with open(file, "r+b") as handle:
                handle.seek(header[stored_name].offset + byte)
                value = handle.read(1)[0]
                handle.seek(header[stored_name].offset + byte)
                handle.write(bytes([value ^ 0x10]))
            return
    raise AssertionError(f"{stored_name} not stored")


@pytest.mark.parametrize(
    ("spec", "part"),
    [
        ("lowrank:4", "lora_B"),
        ("lowrank:4", "lora_A"),
        ("bitdelta", "signs"),
        ("bitdelta,scale=row,embeddings=compress", "scale"),
        ("sparse:0.3,seed=2", "gaps"),
        ("sparse:0.3,seed=2", "values"),
        ("bitdelta", ""),  # a tensor kept dense in bfloat16
    ],
)
def test_a_flipped_bit_in_a_stored_part_is_refused_with_nothing_written(
    llama, residuals, spec, part, tmp_path, small_blocks
):
    copy = tmp_path / "damaged"
    shutil.copytree(residuals[spec], copy)
    name = "model.layers.1.mlp.down_proj.weight" if part else "model.norm.weight"
    _flip_bit(copy, f"{name}.{part}" if part else name)
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(VerificationError, match="does not match the sha256 recorded"):
        api.port(copy, llama.cpt, parent / "out", progress=False)
    assert list(parent.iterdir()) == []


def test_an_older_residual_without_part_digests_is_checked_on_its_decoded_values(
    llama, residuals, tmp_path, small_blocks
):
    spec = "sparse:0.3,seed=2"
    copy = tmp_path / "old"
    shutil.copytree(residuals[spec], copy)
    manifest = json.loads((copy / "residual.json").read_text())
    for entry in manifest["tensors"].values():
        entry["codec"].pop("part_sha256", None)
        entry["codec"].pop("stored_sha256", None)
    (copy / "residual.json").write_text(json.dumps(manifest))
    api.port(copy, llama.cpt, tmp_path / "ported", alpha=ALPHA, progress=False)
    got = load_tensors(tmp_path / "ported")
    for name, values in _expected(llama.cpt, residuals[spec], ALPHA).items():
        assert torch.equal(bits(got[name]), bits(values)), name
    _flip_bit(copy, "model.layers.0.self_attn.q_proj.weight.values")
    with pytest.raises(VerificationError, match="checksum differs"):
        api.port(copy, llama.cpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _no_fused_kernel(monkeypatch):
    monkeypatch.setattr(engine, "_fused_kernel", lambda segment, out_dtype: None)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("lowrank:4", "mmap"),
        ("lowrank:4", "numpy"),
        ("lowrank:4", "no decode-ahead"),
        ("bitdelta,scale=row,embeddings=compress", "no decode-ahead"),
        ("bitdelta,scale=row,embeddings=compress", "no numba"),
        ("bitdelta", "no numba"),
        ("bitdelta,scale=row,embeddings=compress", "mmap"),
        ("bitdelta,scale=row,embeddings=compress", "numpy"),
    ],
)
def test_every_engine_path_decodes_compressed_inputs_to_the_reference_bits(
    llama, residuals, spec, path, tmp_path, monkeypatch, small_blocks
):
    """The fused kernels take encoded inputs decoded into float32 (pread and mmap modes); the numpy path
    (norms, ties/dare), readers that never decode ahead and bitdelta's numpy decoder give the same bits."""
    if path == "mmap":
        monkeypatch.setattr(engine, "READ_MODE", "mmap")
    elif path == "numpy":
        _no_fused_kernel(monkeypatch)
    elif path == "no numba":  # numpy decodes the signs (not ``fused.signs_block``) and combines
        monkeypatch.setattr(fused, "AVAILABLE", False)
    else:
        monkeypatch.setattr(stream, "DECODE_AHEAD", False)
    api.port(residuals[spec], llama.cpt, tmp_path / "ported", alpha=ALPHA, progress=False)
    got = load_tensors(tmp_path / "ported")
    for name, values in _expected(llama.cpt, residuals[spec], ALPHA).items():
        assert torch.equal(bits(got[name]), bits(values)), (spec, path, name)


def test_encoded_inputs_take_the_fused_kernel(llama, residuals, tmp_path, monkeypatch):
    """A port from a lowrank residual runs its encoded tensors through the fused kernel (one pass per
    block after decoding), not the numpy path's dozen passes: the speed of issue 14 §3 depends on it."""
    chosen = []
    original = engine._fused_kernel

    def spy(segment, out_dtype):
        kernel = original(segment, out_dtype)
        chosen.append((is_decoded(segment.plus.info), kernel is not None))
        return kernel

    monkeypatch.setattr(engine, "_fused_kernel", spy)
    api.port(residuals["lowrank:4"], llama.cpt, tmp_path / "ported", progress=False)
    assert (True, True) in chosen and (True, False) not in chosen, chosen


@pytest.mark.parametrize("spec", ["lowrank:4", "bitdelta,scale=row,embeddings=compress"])
def test_a_reader_read_out_of_order_gives_the_reference_and_checks_its_digests(residuals, spec):
    """Reads of any lengths, out of order (the decode-ahead guess then misses), equal the whole-tensor
    reference bit for bit, and ``finish`` still checks every stored byte against its digest."""
    folder = residuals[spec]
    _, checkpoint = stream.open_residual(folder)
    name = "model.layers.1.mlp.down_proj.weight"
    info = checkpoint.tensors[name]
    expected = _reference_residual(folder)[name].reshape(-1)
    fds: dict[Path, int] = {}
    reader = info.decoder.open(lambda path: fds.setdefault(path, os.open(path, os.O_RDONLY)))
    try:
        numel = expected.size
        third = numel // 3
        ranges = [(0, 97), (97, 97), (194, 5), (third, 1000), (100, 37), (199, numel - 199)]
        assert third > 200 and third + 1000 < numel, numel
        for start, count in ranges:
            out = np.full(count + 3, np.nan, np.float32)
            reader.read(start, count, out)
            assert np.array_equal(
                out[:count].view(np.uint32), expected[start : start + count].view(np.uint32)
            )
            assert np.isnan(out[count:]).all()  # nothing written past ``count``
        reader.finish()
    finally:
        for fd in fds.values():
            os.close(fd)


def test_lowrank_decoding_caps_the_blas_threads_and_restores_the_count():
    """OpenBLAS's own threads spin against the engine's writer thread (a 4x slower port under load):
    decoders multiply on one thread, and the user's setting is back afterwards, even after an error."""
    from hf_residual.codecs import blas

    before = blas.threads()
    if before is None:
        pytest.skip("threadpoolctl finds no BLAS in this process")
    with blas.one_thread():
        assert blas.threads() == 1
    assert blas.threads() == before
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert blas.decode_threads() == max(1, cores - 2) == stream.DECODE_THREADS  # main + writer keep 2 cores
    with blas.one_thread(blas.decode_threads()):
        assert blas.threads() == min(before, blas.decode_threads())
    assert blas.threads() == before
    with pytest.raises(ValueError, match="inside"), blas.one_thread():
        raise ValueError("inside")
    assert blas.threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_a_forked_child_decodes_ahead_on_a_worker_of_its_own(residuals, tmp_path):
    """A child forked after the parent started its decode worker has no such thread: it starts its own
    instead of queueing blocks no thread would run (the port would hang)."""
    assert stream._pool().submit(lambda: 1).result() == 1  # the parent's worker is running
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        try:
            done = stream._pool().submit(lambda: 7)
            os._exit(0 if done.result(timeout=30) == 7 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
