"""CI runs everything: nothing skips under HF_RESIDUAL_FAIL_ON_SKIP, and .ci/run installs what tests need."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPING_TESTS = {
    "test_inside.py": "import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    pytest.skip('no tool')\n",
    "test_module.py": "import pytest\npytest.importorskip('no_such_package_hf_residual')\n",
    "test_passes.py": "def test_c():\n    pass\n",
}


def _run_pytest(folder: Path, fail_on_skip: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    env.pop("HF_RESIDUAL_FAIL_ON_SKIP", None)
    if fail_on_skip:
        env["HF_RESIDUAL_FAIL_ON_SKIP"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "strict_skips",
        "-p",
        "no:cacheprovider",
        "-q",
        str(folder),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=120)


@pytest.mark.parametrize("name", ["test_inside.py", "test_module.py"])
def test_a_skip_fails_the_run_only_when_nothing_may_skip(tmp_path, name):
    (tmp_path / name).write_text(SKIPPING_TESTS[name])
    (tmp_path / "test_passes.py").write_text(SKIPPING_TESTS["test_passes.py"])
    local = _run_pytest(tmp_path, fail_on_skip=False)
    assert local.returncode == 0, local.stdout
    assert "1 skipped" in local.stdout
    strict = _run_pytest(tmp_path, fail_on_skip=True)
    assert strict.returncode == 1, strict.stdout


def test_ci_script_runs_readme_test_command_strictly_and_the_slow_set():
    script = (ROOT / ".ci" / "run").read_text()
    quiet_removed = script.replace(" -q ", " ")
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"Set up and run the tests:\n\n```bash\n(.+?)\n```", readme).group(1)
    # Each step of README's command is in .ci/run, and its pytest call comes after the strict-skip switch.
    for step in test_command.split(" && "):
        if step.startswith(("python3 -m venv", ". .venv")):
            continue
        assert step in quiet_removed, f"README's step {step!r} is not in .ci/run"
    lines = [line.strip() for line in script.splitlines()]
    assert lines.index("export HF_RESIDUAL_FAIL_ON_SKIP=1") < lines.index("python -m pytest")
    assert "python -m pytest -m slow" in lines
    # No install step may turn its failure into a message: `|| echo` hides a broken install.
    assert "|| echo" not in script and "|| true" not in script
    assert "set -euo pipefail" in script
