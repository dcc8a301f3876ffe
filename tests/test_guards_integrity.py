"""Guards that really guard: residual checksums checked by apply, losslessness checked whatever the
dtypes, and no file descriptor left open when the engine aborts.

Everything runs on real safetensors files: tiny real models (conftest ``families``), and residuals
tampered with by flipping bytes in a shard's data section with its header left intact.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import uuid
from pathlib import Path

import pytest
import torch
from helpers import bits, load_tensors
from safetensors.torch import load_file, save_file

from hf_residual import api
from hf_residual.core import engine, kernels
from hf_residual.errors import NonFiniteError, VerificationError

# --- helpers ---------------------------------------------------------------------------------------


def _data_start_and_header(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8 : 8 + length])


def _shard_of(folder: Path, name: str) -> Path:
    for file in sorted(folder.glob("residual*.safetensors")):
        if name in _data_start_and_header(file)[1]:
            return file
    raise KeyError(name)


def _flip(folder: Path, name: str, element: int) -> None:
    """Flip the lowest mantissa bit of one element of tensor ``name`` (little endian: its first byte).

    Only data bytes change: the header, the file size and the manifest stay as they were, and the value
    stays finite (so only the checksum can tell).
    """
    file = _shard_of(folder, name)
    start, header = _data_start_and_header(file)
    entry = header[name]
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[entry["dtype"]]
    position = start + entry["data_offsets"][0] + element * itemsize
    assert position < start + entry["data_offsets"][1]
    with open(file, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([byte ^ 0x01]))


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _nothing_written(output: Path) -> bool:
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    return not output.exists() and not leftovers


@pytest.fixture(scope="module")
def residuals(llama, families, tmp_path_factory) -> dict[str, Path]:
    """Untouched residuals, one per case: float32, bfloat16, and float32 with a grown vocabulary."""
    root = tmp_path_factory.mktemp("residuals")
    grown = families("llama", "bfloat16", extra_instruct_tokens=8)
    made = {
        "float32": (llama, "float32"),
        "bfloat16": (llama, "bfloat16"),
        "grown": (grown, "float32"),
    }
    out = {}
    for key, (family, dtype) in made.items():
        api.extract(family.instruct, family.base, root / key, dtype=dtype, progress=False)
        out[key] = root / key
    out["grown_family"] = grown.cpt
    return out


EMBED = "model.embed_tokens.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


# --- checksums of a dense residual -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "fused-mmap", "numpy"])
@pytest.mark.parametrize("codec", ["float32", "bfloat16"])
def test_apply_refuses_residual_with_altered_data(residuals, llama, tmp_path, monkeypatch, codec, path):
    if path == "numpy":
        monkeypatch.setattr(engine.fused, "AVAILABLE", False)
    if path == "fused-mmap":
        monkeypatch.setattr(engine, "READ_MODE", "mmap")
    damaged = _copy(residuals[codec], tmp_path / "residual")
    _flip(damaged, DOWN, element=37)
    out = tmp_path / "out"
    fds, threads = _open_fds(), threading.active_count()
    with pytest.raises(VerificationError) as info:
        api.apply(damaged, llama.cpt, out, progress=False)
    message = str(info.value)
    assert DOWN in message and "damaged" in message and "re-download" in message
    assert _nothing_written(out)
    assert (_open_fds(), threading.active_count()) == (fds, threads)  # writer and hasher threads ended


@pytest.mark.parametrize("part", ["base rows", "new rows"])
def test_apply_checks_a_tensor_across_its_two_segments(residuals, tmp_path, part):
    """A grown embedding is read in two segments (residual rows, then absolute rows): one checksum."""
    manifest = json.loads((residuals["grown"] / "residual.json").read_text())
    entry = manifest["tensors"][EMBED]
    per_row = entry["shape"][1]
    row = 3 if part == "base rows" else entry["absolute_rows_from"] + 2
    damaged = _copy(residuals["grown"], tmp_path / "residual")
    _flip(damaged, EMBED, element=row * per_row + 5)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="embed_tokens"):
        api.apply(damaged, residuals["grown_family"], out, progress=False)
    assert _nothing_written(out)


def test_untouched_residuals_still_apply(residuals, llama, tmp_path):
    for key, target in (("float32", llama.cpt), ("grown", residuals["grown_family"])):
        result = api.apply(residuals[key], target, tmp_path / key, progress=False)
        assert result.output.is_dir()


@pytest.mark.parametrize(
    "change", [("dtype", "BF16"), ("shape", "rows"), ("sha256", "0" * 64)], ids=["dtype", "shape", "sha"]
)
def test_apply_checks_manifest_against_shards_before_arithmetic(
    residuals, llama, tmp_path, monkeypatch, change
):
    folder = _copy(residuals["float32"], tmp_path / "residual")
    path = folder / "residual.json"
    manifest = json.loads(path.read_text())
    field, value = change
    entry = manifest["tensors"][DOWN]
    if field == "shape":
        entry["shape"] = [entry["shape"][1], entry["shape"][0]]  # same size, other shape
    else:
        entry[field] = value
    path.write_text(json.dumps(manifest))
    if field != "sha256":  # a header mismatch is found before any byte is read

        def no_arithmetic(*args, **kwargs):
            raise AssertionError("the engine ran on a residual whose header disagrees with its manifest")

        monkeypatch.setattr(engine, "execute", no_arithmetic)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=DOWN):
        api.apply(folder, llama.cpt, out, progress=False)
    assert _nothing_written(out)


def test_apply_refuses_tampered_residual_from_the_hub(hub, residuals, llama, tmp_path):
    damaged = _copy(residuals["float32"], tmp_path / "residual")
    _flip(damaged, DOWN, element=11)
    repo = f"org/r{uuid.uuid4().hex[:8]}-residual"
    hub.add_repo(repo, damaged)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="re-download"):
        api.apply(repo, llama.cpt, out, progress=False)
    assert _nothing_written(out)
    # The same repo untouched applies (the check is not what refuses it).
    good = f"org/r{uuid.uuid4().hex[:8]}-residual"
    hub.add_repo(good, residuals["float32"])
    assert api.apply(good, llama.cpt, tmp_path / "good", progress=False).output.is_dir()


# --- lossless: true is measured whatever the dtypes ------------------------------------------------


def _mixed_pair(llama, root: Path, base_dtype: torch.dtype, instruct_dtype: torch.dtype):
    """Base and instruct folders in different dtypes where some elements cannot round-trip.

    Most elements are the toy family's (instruct a small perturbation of base). In each matrix a few
    elements of instruct are tiny while base is large there: ``I - B`` in float32 drops the low bits of
    ``I``, so ``round(B + R)`` differs from ``I`` (and base in float32 carries bits bfloat16 cannot hold).
    """
    gen = torch.Generator().manual_seed(7)
    folders = {}
    base_src, instruct_src = load_tensors(llama.base), load_tensors(llama.instruct)
    bases, instructs = {}, {}
    for name in sorted(base_src):
        b = base_src[name].float()
        i = instruct_src[name].float()
        if b.dim() == 2:
            b = b + torch.randn(b.shape, generator=gen) * 1e-4  # float32 bits beyond bfloat16
            flat_b, flat_i = b.view(-1), i.view(-1)
            picks = torch.randperm(flat_b.numel(), generator=gen)[:16]
            flat_b[picks] = 1000.0 + torch.rand(16, generator=gen) * 100
            flat_i[picks] = (torch.rand(16, generator=gen) + 0.5) * 1e-5
        bases[name], instructs[name] = b.to(base_dtype), i.to(instruct_dtype)
    for role, tensors in (("base", bases), ("instruct", instructs)):
        folder = root / role
        shutil.copytree(getattr(llama, role), folder, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        folders[role] = folder
    return folders, bases, instructs


def _independent_inexact(bases: dict, instructs: dict) -> int:
    count = 0
    for name, i in instructs.items():
        residual = i.float() - bases[name].float()  # float32, as the residual stores it
        back = (bases[name].float() + residual).to(i.dtype)
        count += int((bits(back) != bits(i)).sum())
    return count


@pytest.mark.parametrize(
    "base_dtype,instruct_dtype",
    [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)],
    ids=["f32-base-bf16-instruct", "f16-base-bf16-instruct", "bf16-base-f16-instruct"],
)
def test_lossless_is_measured_when_dtypes_differ(llama, tmp_path, base_dtype, instruct_dtype):
    folders, bases, instructs = _mixed_pair(llama, tmp_path, base_dtype, instruct_dtype)
    expected = _independent_inexact(bases, instructs)
    assert expected > 0  # the data really has elements that cannot round-trip
    result = api.extract(
        folders["instruct"], folders["base"], tmp_path / "r", dtype="float32", progress=False
    )
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    assert result.details["inexact_elements"] == expected == manifest["inexact_elements"]
    assert manifest["lossless"] is False and result.details["lossless"] is False


def test_lossless_true_when_mixed_dtypes_do_round_trip(llama, tmp_path):
    """Base in float32 holding exactly the bfloat16 values of another model: every element comes back."""
    bases = {k: v.float() for k, v in load_tensors(llama.base).items()}
    instructs = load_tensors(llama.instruct)
    assert _independent_inexact(bases, instructs) == 0
    base = tmp_path / "base"
    shutil.copytree(llama.base, base, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(bases, base / "model.safetensors", metadata={"format": "pt"})
    result = api.extract(llama.instruct, base, tmp_path / "r", dtype="float32", progress=False)
    assert result.details["lossless"] is True and result.details["inexact_elements"] == 0
    # and base + residual, rounded to the instruct dtype, is the instruct model bit for bit
    applied = api.apply(tmp_path / "r", base, tmp_path / "applied", progress=False, force=True)
    got = load_tensors(applied.output)
    for name, i in instructs.items():
        assert torch.equal(bits(got[name].to(i.dtype)), bits(i)), name


# --- the writer closes its files when the engine aborts --------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _nan_target(llama, root: Path) -> Path:
    """The CPT model with a NaN in a tensor that is not the first one of its output shard."""
    target = root / "nan-target"
    shutil.copytree(llama.cpt, target)
    file = sorted(target.glob("*.safetensors"))[0]
    tensors = load_file(file)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[tensors[name].numel() // 2] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "numpy"])
def test_aborted_runs_leave_no_descriptor_open(llama, tmp_path, monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(engine.fused, "AVAILABLE", False)
    target = _nan_target(llama, tmp_path)
    api.port(llama.instruct, llama.cpt, tmp_path / "warm", base=llama.base, progress=False)  # imports, caches
    before, threads = _open_fds(), threading.active_count()
    for run in range(5):
        out = tmp_path / f"out{run}"
        with pytest.raises(NonFiniteError):
            api.port(llama.instruct, target, out, base=llama.base, progress=False, force=True)
        assert _nothing_written(out)
    assert _open_fds() == before
    assert threading.active_count() == threads


def test_read_fault_mid_shard_leaves_no_descriptor_open(llama, tmp_path, monkeypatch):
    """A read that fails inside the engine (a disk error, a file truncated under us) while a shard is open."""
    real_read, real_execute = kernels.pread_into, engine.execute
    state = {"armed": False, "calls": 0, "fail_at": 0}

    def faulty(fd, buffer, offset):
        if state["armed"]:
            state["calls"] += 1
            if state["calls"] == state["fail_at"]:
                raise OSError("injected read fault")
        real_read(fd, buffer, offset)

    def armed_execute(*args, **kwargs):
        state["armed"], state["calls"] = True, 0
        try:
            return real_execute(*args, **kwargs)
        finally:
            state["armed"] = False

    api.port(llama.instruct, llama.cpt, tmp_path / "warm", base=llama.base, progress=False)
    before = _open_fds()
    monkeypatch.setattr(kernels, "pread_into", faulty)
    monkeypatch.setattr(engine, "execute", armed_execute)
    for run in range(5):
        state["fail_at"] = 4 + 7 * run  # a few tensors into the shard, a different place each run
        out = tmp_path / f"out{run}"
        with pytest.raises(OSError, match="injected"):
            api.port(llama.instruct, llama.cpt, out, base=llama.base, progress=False)
        assert _nothing_written(out)
    assert _open_fds() == before
