"""Start-up cost: what the command line imports before it needs it, and the numba kernels' disk cache.

numba costs about 0.5-1 s to import and dispatch for the first time (issue 14 §5), so it is loaded by
``core.fused`` when the engine first asks for a kernel: help, argument errors and errors found while
planning never import it. Each case runs in a fresh interpreter (this process has imported numba long ago)
and prints the modules it ended with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("numba", "llvmlite", "scipy", "torch", "transformers")

# Runs the CLI (or other code) in-process, then reports its exit code and which HEAVY modules were imported.
WRAPPER = r"""
import json, sys
heavy = {heavy!r}
code = 0
try:
    {body}
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
print("\n@@" + json.dumps({{"code": code, "imported": [m for m in heavy if m in sys.modules]}}))
"""


def run_python(body: str, env: dict | None = None) -> tuple[int, list[str], str]:
    """Run ``body`` (one statement) in a fresh interpreter: (exit code, heavy modules imported, stderr)."""
    script = WRAPPER.format(heavy=HEAVY, body=body)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert "@@" in done.stdout, f"the wrapper did not finish:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.rsplit("@@", 1)[1])
    return report["code"], report["imported"], done.stderr


def run_cli(*argv: str) -> tuple[int, list[str], str]:
    return run_python(f"from hf_residual.cli import main; code = main({list(argv)!r})")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["port", "--help"], ["apply", "--help"], ["extract", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_imports_nothing_heavy(argv):
    code, imported, _ = run_cli(*argv)
    assert code == 0
    assert imported == [], f"`hf-residual {' '.join(argv)}` imported {imported}"


@pytest.mark.parametrize(
    "argv",
    [["port"], ["port", "a", "--alpha", "lots"], ["prot"], ["port", "a", "--to", "b", "--ouput", "c"]],
    ids=lambda argv: " ".join(argv),
)
def test_argument_errors_import_nothing_heavy(argv):
    code, imported, stderr = run_cli(*argv)
    assert code == 2, stderr
    assert "error:" in stderr
    assert imported == [], f"`hf-residual {' '.join(argv)}` imported {imported}"


def test_error_found_while_planning_does_not_load_numba(tmp_path, llama):
    """An input that is not a model fails before the engine runs, without numba's second of start-up."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    code, imported, stderr = run_cli(
        "port", str(llama.instruct), "--base", str(empty), "--to", str(llama.cpt), "-o", str(tmp_path / "out")
    )
    assert code != 0, stderr
    assert "error:" in stderr and "not-a-model" in stderr
    assert "numba" not in imported and "llvmlite" not in imported


def test_engine_import_is_light_and_a_port_loads_the_kernels(tmp_path, llama):
    """Importing the engine does not import numba; running a port does, and uses the fused kernels."""
    out = tmp_path / "ported"
    body = (
        "import hf_residual.core.engine as engine, hf_residual.core.fused as fused; "
        "assert 'numba' not in sys.modules, 'engine import loaded numba'; "
        "assert 'port_block' not in vars(fused); "
        f"from hf_residual.cli import main; code = main(['port', {str(llama.instruct)!r}, '--base', "
        f"{str(llama.base)!r}, '--to', {str(llama.cpt)!r}, '-o', {str(out)!r}, '-q']); "
        "assert fused.AVAILABLE and 'port_block' in vars(fused), 'the port did not load the fused kernels'"
    )
    code, imported, stderr = run_python(body)
    assert code == 0, stderr
    assert "numba" in imported
    # numba's first dispatch would import scipy only to learn whether BLAS exists; fused defers that
    assert "scipy" not in imported and "torch" not in imported


def test_scipy_deferral_leaves_numba_and_scipy_usable():
    """After the kernels load without scipy, scipy imports normally and numba knows BLAS is there."""
    body = (
        "import importlib.util; from hf_residual.core import fused; assert fused.load(); "
        "assert 'scipy' not in sys.modules; "
        "import numba.np.arraymath as am; "
        "assert am._HAVE_BLAS == (importlib.util.find_spec('scipy') is not None), am._HAVE_BLAS; "
        "import scipy.linalg; assert scipy.linalg.cython_blas is not None"
    )
    code, _, stderr = run_python(body)
    assert code == 0, stderr


def test_kernels_load_from_the_disk_cache():
    """The kernels are compiled once and then loaded from numba's cache: a second process compiles none."""
    from hf_residual.core import fused, fused_jit

    assert all(getattr(fused_jit, name)._cache.__class__.__name__ != "NullCache" for name in fused.KERNELS)
    warm = (
        "import numpy as np; from hf_residual.core import fused; fused.load(); "
        "u = np.zeros(8, np.uint16); f = np.zeros(8, np.float32); a = np.float32(1); "
        "fused.port_block(u, u, a, u, u); fused.apply_block(u, a, u, u); fused.copy_block(u, f); "
        "stats = [getattr(fused, n).stats for n in ('port_block', 'apply_block', 'copy_block')]; "
        "print('@misses', sum(sum(s.cache_misses.values()) for s in stats), "
        "sum(sum(s.cache_hits.values()) for s in stats))"
    )
    for _attempt in range(2):  # the first process may compile (a fresh checkout), the second must not
        done = subprocess.run([sys.executable, "-c", warm], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        misses, hits = map(int, done.stdout.split("@misses", 1)[1].split())
    # 3 calls above, plus copy_block on float32 that fused.load() makes to load numba's registries
    assert (misses, hits) == (0, 4), (
        f"second process: {misses} kernels compiled, {hits} loaded from the cache"
    )


def test_without_numba_a_port_uses_the_numpy_path_with_the_same_bits(tmp_path, llama):
    """Where numba cannot be imported, the lazy load says so (AVAILABLE False) and the numpy path runs."""
    from helpers import matches, reference_folders

    out = tmp_path / "ported"
    body = (
        "sys.modules['numba'] = None; "  # import numba now raises ImportError
        f"from hf_residual.cli import main; code = main(['port', {str(llama.instruct)!r}, '--base', "
        f"{str(llama.base)!r}, '--to', {str(llama.cpt)!r}, '-o', {str(out)!r}, '-q']); "
        "from hf_residual.core import fused; assert fused.AVAILABLE is False and 'port_block' not in vars(fused)"
    )
    code, _, stderr = run_python(body)
    assert code == 0, stderr
    assert matches(out, reference_folders(llama.cpt, llama.instruct, llama.base))


@pytest.mark.parametrize(("argv", "expected"), [(["--version"], 0), (["port", "nowhere", "--to", "x"], 2)])
def test_the_executable_exits_with_mains_code_and_skips_the_final_collection(argv, expected):
    """``hf-residual`` (the console script) freezes the collector before exiting, so the interpreter's final
    collection does not walk every object made by the run (about 0.3 s once numba is loaded); exit handlers
    still run and the exit code is ``main``'s, for a success and for an error."""
    script = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('@@frozen', gc.get_freeze_count(), flush=True))\n"
        f"sys.argv = ['hf-residual', *{argv!r}]\n"
        "from hf_residual.cli import console_main\n"
        "console_main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == expected, done.stderr[-2000:]
    frozen = int(done.stdout.rsplit("@@frozen", 1)[1])
    assert frozen > 1000, f"only {frozen} objects frozen"


def test_the_installed_command_is_console_main():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-residual"]
    assert script.value == "hf_residual.cli:console_main"
