"""Bad input: a clear error, a non-zero exit, and nothing written (CLI run as a user runs it)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tensors
from safetensors.torch import save_file

from hf_residual.cli import main
from hf_residual.core import output as output_module


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(folder: Path, change) -> None:
    """Load every tensor of a single-file model, let ``change`` edit the dict, save it back."""
    tensors = load_tensors(folder)
    change(tensors)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def assert_nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "staging folder left behind"


@pytest.fixture
def fam(families):
    return families("llama", "bfloat16")


def test_missing_tensor(fam, tmp_path, capsys):
    instruct = copy_model(fam.instruct, tmp_path / "instruct")
    rewrite(instruct, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    code, err = run_cli(capsys, "port", instruct, "--base", fam.base, "--to", fam.cpt, "-o", tmp_path / "out")
    assert code == 2
    assert "missing from the instruct model" in err and "model.layers.1.mlp.up_proj.weight" in err
    assert_nothing_written(tmp_path)


def test_shape_mismatch(fam, tmp_path, capsys):
    target = copy_model(fam.cpt, tmp_path / "target")
    rewrite(target, lambda t: t.update({"model.norm.weight": torch.ones(7, dtype=torch.bfloat16)}))
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", target, "-o", tmp_path / "out"
    )
    assert code == 2 and "shape mismatch for 'model.norm.weight'" in err
    assert_nothing_written(tmp_path)


def test_different_architecture(fam, families, tmp_path, capsys):
    mistral = families("mistral", "bfloat16")
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", mistral.cpt, "-o", tmp_path / "out"
    )
    assert code == 2 and "'mistral'" in err and "'llama'" in err
    assert_nothing_written(tmp_path)


def test_target_not_a_descendant_then_force(fam, tmp_path, capsys):
    stranger = copy_model(fam.cpt, tmp_path / "stranger")
    generator = torch.Generator().manual_seed(123)
    rewrite(
        stranger,
        lambda t: t.update(
            {k: (torch.randn(v.shape, generator=generator) * 0.02).to(v.dtype) for k, v in t.items()}
        ),
    )
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", stranger, "-o", tmp_path / "out", "-q"
    )
    assert code == 2 and "does not look like a descendant" in err and "--force" in err
    assert_nothing_written(tmp_path)
    code, _ = run_cli(
        capsys,
        "port",
        fam.instruct,
        "--base",
        fam.base,
        "--to",
        stranger,
        "-o",
        tmp_path / "out",
        "-q",
        "--force",
    )
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_input(fam, tmp_path, capsys, bad):
    instruct = copy_model(fam.instruct, tmp_path / "instruct")

    def poison(tensors):
        weight = tensors["model.layers.1.self_attn.o_proj.weight"]
        weight[3, 5] = bad

    rewrite(instruct, poison)
    code, err = run_cli(
        capsys, "port", instruct, "--base", fam.base, "--to", fam.cpt, "-o", tmp_path / "out", "-q"
    )
    assert code == 2
    assert "NaN or Inf in input tensor 'model.layers.1.self_attn.o_proj.weight'" in err
    assert_nothing_written(tmp_path)


def test_float16_overflow_in_result(families, tmp_path, capsys):
    fam16 = families("llama", "float16")
    instruct = copy_model(fam16.instruct, tmp_path / "instruct")
    target = copy_model(fam16.cpt, tmp_path / "target")
    rewrite(instruct, lambda t: t["model.norm.weight"].fill_(60000.0))
    rewrite(target, lambda t: t["model.norm.weight"].fill_(60000.0))
    code, err = run_cli(
        capsys,
        "port",
        instruct,
        "--base",
        fam16.base,
        "--to",
        target,
        "-o",
        tmp_path / "out",
        "-q",
        "--force",
    )
    assert code == 2 and "overflows F16" in err and "--alpha" in err
    assert_nothing_written(tmp_path)


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) loaded."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_pickled_only_checkpoint_is_refused_and_never_unpickled(fam, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(fam.base / "config.json", pickled / "config.json")
    marker = tmp_path / "marker.txt"
    boom = _Boom()
    boom.marker = marker
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", pickled, "--to", fam.cpt, "-o", tmp_path / "out"
    )
    assert code == 2 and "only pickled weights" in err and "pytorch_model.bin" in err
    assert not marker.exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "header-garbage", "header-length"])
def test_corrupted_safetensors(fam, tmp_path, capsys, damage):
    base = copy_model(fam.base, tmp_path / "base")
    file = base / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "header-garbage":
        data[10:20] = b"\xff" * 10
    else:
        data[0:8] = (10**12).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    code, err = run_cli(capsys, "port", fam.instruct, "--base", base, "--to", fam.cpt, "-o", tmp_path / "out")
    assert code == 2 and "model.safetensors" in err and "re-download or re-save" in err
    assert_nothing_written(tmp_path)


def test_output_exists_then_overwrite(fam, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "port", fam.instruct, "--base", fam.base, "--to", fam.cpt, "-o", out, "-q")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", fam.cpt, "-o", out, "-q", "--overwrite"
    )
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_not_enough_disk_is_checked_before_writing(fam, tmp_path, capsys, monkeypatch):
    """Test double: free space is reported as 1 MB (a real full disk cannot be made here safely)."""
    monkeypatch.setattr(output_module, "free_bytes", lambda folder: 1_000_000)
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", fam.cpt, "-o", tmp_path / "out"
    )
    assert code == 2 and "not enough free disk" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["port", "extract"])
def test_bytes_that_do_not_read_back_stop_the_run(fam, tmp_path, capsys, monkeypatch, command):
    """Fault injection (a failing disk cannot be made here): one byte of a tensor block reaches the file
    changed, while the bytes the writer meant stay as they were."""
    from hf_residual.core import shard_files

    real_write_all_at = shard_files.write_all_at

    def damaging_write_all_at(fd, view, offset):
        if len(view) > 1000:  # tensor bytes, not a lone header
            damaged = np.frombuffer(view, np.uint8)  # in place: an O_DIRECT chunk must stay aligned
            damaged[1000] ^= 0x40
            try:
                real_write_all_at(fd, view, offset)
            finally:
                damaged[1000] ^= 0x40
        else:
            real_write_all_at(fd, view, offset)

    monkeypatch.setattr(shard_files, "write_all_at", damaging_write_all_at)
    argv = {"port": ["--to", fam.cpt], "extract": []}[command]
    code, err = run_cli(
        capsys, command, fam.instruct, "--base", fam.base, *argv, "-o", tmp_path / "out", "-q"
    )
    assert code == 2 and "read back differ" in err
    assert_nothing_written(tmp_path)


def test_target_with_other_vocabulary(families, tmp_path, capsys):
    """A target with fewer vocabulary rows than the base is refused (a grown one is ported: test_vocab)."""
    fam = families("llama", "bfloat16")
    target = copy_model(fam.cpt, tmp_path / "target")

    def shrink(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:-4].clone()

    rewrite(target, shrink)
    code, err = run_cli(
        capsys, "port", fam.instruct, "--base", fam.base, "--to", target, "-o", tmp_path / "out"
    )
    assert code == 2 and "vocabulary differs from the base" in err


def test_missing_folder_and_missing_base(fam, tmp_path, capsys):
    code, err = run_cli(
        capsys, "port", tmp_path / "nope", "--base", fam.base, "--to", fam.cpt, "-o", tmp_path / "o"
    )
    assert code == 2 and "no such local folder" in err
    code, err = run_cli(capsys, "port", fam.instruct, "--to", fam.cpt, "-o", tmp_path / "o")
    assert code == 2 and "--base" in err


def test_residual_with_unknown_format_version(fam, tmp_path, capsys):
    assert run_cli(capsys, "extract", fam.instruct, "--base", fam.base, "-o", tmp_path / "r", "-q")[0] == 0
    manifest = json.loads((tmp_path / "r" / "residual.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "r" / "residual.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "apply", tmp_path / "r", "--to", fam.cpt, "-o", tmp_path / "out")
    assert code == 2 and "newer than this hf-residual" in err and "pip install -U hf-residual" in err
    assert_nothing_written(tmp_path)


def test_debug_flag_shows_traceback(fam, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(
            [
                "--debug",
                "port",
                str(tmp_path / "nope"),
                "--base",
                str(fam.base),
                "--to",
                str(fam.cpt),
                "-o",
                str(tmp_path / "o"),
            ]
        )
