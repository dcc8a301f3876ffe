"""Signals and durability: SIGTERM cleans up like Ctrl-C, outputs are fsynced and replaced atomically,
and a push without ``-o`` stages beside the Hugging Face cache rather than in ``$TMPDIR``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hf_residual import api
from hf_residual.core import output
from hf_residual.errors import InsufficientDiskError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux only")


# --- killing a real run mid-stream ------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    """Hidden entries (staging, retired and temporary folders are all named ``.<something>``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _streaming(parent: Path) -> bool:
    """A staging folder under ``parent`` (at any depth) holds an open shard. It may have no bytes yet: an
    O_DIRECT shard is written in 8 MB chunks, so a small one gets its bytes only when it is finished."""
    return any(any(staging.glob("*.safetensors")) for staging in parent.rglob(".*.partial-*"))


def _interrupt_mid_stream(
    args: list[str], parent: Path, tmpdir: Path, sig: int
) -> subprocess.CompletedProcess:
    """Run the CLI with a tiny engine block (slow), send ``sig`` once a shard is being written."""
    env = {**os.environ, "HF_RESIDUAL_BLOCK_LOG2": "2", "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_residual.cli", *args, "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _streaming(parent):
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_port_killed_mid_stream_leaves_nothing_and_keeps_the_prior_output(llama, tmp_path, sig, code):
    parent, tmpdir = tmp_path / "models", tmp_path / "tmp"
    parent.mkdir()
    tmpdir.mkdir()
    prior = parent / "ported"
    prior.mkdir()
    (prior / "config.json").write_text('{"prior": true}')
    args = ["port", str(llama.instruct), "--to", str(llama.cpt), "--base", str(llama.base)]
    done = _interrupt_mid_stream([*args, "-o", str(prior), "--overwrite"], parent, tmpdir, sig)
    assert done.returncode == code, done.stderr
    assert "interrupted:" in done.stderr and "Traceback" not in done.stderr
    assert _leftovers(parent) == [] and list(tmpdir.iterdir()) == []
    assert sorted(p.name for p in prior.iterdir()) == ["config.json"]
    assert (prior / "config.json").read_text() == '{"prior": true}'


def test_a_lossy_extract_killed_mid_stream_removes_its_exact_temporary_folder(llama, tmp_path):
    parent, tmpdir = tmp_path / "models", tmp_path / "tmp"
    parent.mkdir()
    tmpdir.mkdir()
    args = ["extract", str(llama.instruct), "--base", str(llama.base), "--codec", "lowrank:4"]
    done = _interrupt_mid_stream([*args, "-o", str(parent / "r")], parent, tmpdir, signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert _leftovers(parent) == [] and list(tmpdir.iterdir()) == []
    assert not (parent / "r").exists()


def test_an_apply_of_a_compressed_residual_killed_mid_stream_leaves_nothing(llama, tmp_path):
    residual = tmp_path / "lowrank"
    api.extract(
        llama.instruct, llama.base, residual, codec="lowrank:4", max_shard_size="20KB", progress=False
    )
    parent, tmpdir = tmp_path / "models", tmp_path / "tmp"
    parent.mkdir()
    tmpdir.mkdir()
    args = ["apply", str(residual), "--to", str(llama.cpt), "-o", str(parent / "ported")]
    done = _interrupt_mid_stream(args, parent, tmpdir, signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert _leftovers(parent) == [] and list(tmpdir.iterdir()) == []
    assert not (parent / "ported").exists()


def test_the_cli_restores_the_signal_handlers_it_installed(llama, tmp_path):
    from hf_residual.cli import main

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    args = ["port", str(llama.instruct), "--to", str(llama.cpt), "--base", str(llama.base)]
    assert main([*args, "-o", str(tmp_path / "out"), "-q"]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_api_installs_no_signal_handler(llama, tmp_path, monkeypatch):
    installed = []
    monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a))
    api.port(llama.instruct, llama.cpt, tmp_path / "out", base=llama.base, progress=False)
    assert installed == []


# --- atomic replace and fsync ------------------------------------------------------------------------------


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


@linux_only
def test_exchange_swaps_two_folders_in_one_call(tmp_path):
    old, new = _folder(tmp_path / "out", "old"), _folder(tmp_path / ".out.partial-x", "new")
    assert output.exchange(new, old) is True
    assert (old / "config.json").read_text() == "new"
    assert (new / "config.json").read_text() == "old"


@linux_only
def test_overwrite_never_leaves_the_name_empty(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    seen = []
    real_rename, real_path_rename = os.rename, Path.rename

    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        seen.append(out.exists())

    def path_rename(self, target):
        result = real_path_rename(self, target)
        seen.append(out.exists())
        return result

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Path, "rename", path_rename)
    with output.staged_output(out, overwrite=True, required_bytes=0) as staging:
        (staging / "config.json").write_text("new")
    assert False not in seen
    assert (out / "config.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_overwrite_falls_back_to_two_renames_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    with output.staged_output(out, overwrite=True, required_bytes=0) as staging:
        (staging / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_signal_during_the_swap_is_raised_once_the_old_output_is_gone(tmp_path, monkeypatch):
    from hf_residual.cli import Terminated, _on_signal

    out = _folder(tmp_path / "out", "old")
    real_exchange = output.exchange

    def exchange_during_a_signal(a, b):
        _on_signal(signal.SIGTERM, None)  # what the CLI's handler does when SIGTERM arrives here
        return real_exchange(a, b)

    monkeypatch.setattr(output, "exchange", exchange_during_a_signal)
    with pytest.raises(Terminated), output.staged_output(out, overwrite=True, required_bytes=0) as staging:
        (staging / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_second_signal_does_not_stop_the_cleanup(tmp_path, monkeypatch):
    from hf_residual.cli import _on_signal

    real_rmtree = shutil.rmtree

    def rmtree_during_a_signal(path, *args, **kwargs):
        _on_signal(signal.SIGINT, None)  # a second Ctrl-C while the staging folder is being removed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_during_a_signal)
    with (
        pytest.raises(KeyboardInterrupt),
        output.staged_output(tmp_path / "out", overwrite=False, required_bytes=0) as staging,
    ):
        (staging / "model.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "out"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with output.staged_output(out, overwrite=False, required_bytes=0) as staging:
        (staging / "model.safetensors").write_bytes(b"x" * 100)
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("{}")
    before = {path for path, exists in synced if not exists}
    assert {str(staging / "model.safetensors"), str(staging / "sub" / "a.json")} <= before
    assert {str(staging), str(staging / "sub")} <= before
    assert (str(tmp_path), True) in synced  # the parent, after the rename


# --- a push without -o stages beside the Hugging Face cache ------------------------------------------------


@pytest.fixture
def tmpdir_only(tmp_path, monkeypatch):
    """TMPDIR pointed at an empty folder, for this process and (through the environment) its children."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_push_without_output_stages_under_hf_home_not_tmpdir(llama, tmp_path, monkeypatch, tmpdir_only):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    result = api.port(
        llama.instruct, llama.cpt, base=llama.base, push_to="org/ported", dry_run=True, progress=False
    )
    assert result.details["temporary_output"]
    assert result.output.is_relative_to(home / "hf-residual" / "staging")
    assert not result.output.exists()
    assert list(tmpdir_only.iterdir()) == []
    assert list((home / "hf-residual" / "staging").iterdir()) == []


def test_a_push_without_output_checks_free_space_under_hf_home(llama, tmp_path, monkeypatch, tmpdir_only):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(output, "free_bytes", lambda folder: 1000)
    with pytest.raises(InsufficientDiskError) as error:
        api.port(llama.instruct, llama.cpt, base=llama.base, push_to="org/p", dry_run=True, progress=False)
    message = str(error.value)
    assert "HF_HOME" in message and str(home) in message and "-o" in message
    assert list(tmpdir_only.iterdir()) == []
    assert list((home / "hf-residual" / "staging").iterdir()) == []
