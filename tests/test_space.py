"""The Gradio Space (spaces/hf-residual-demo): its config, and the real app launched on 127.0.0.1 and
driven with gradio_client (chat turns to every model, a port, the results tab).

Most tests run the app in-process on the offline toy family, built once per module in a temporary folder.
The default mode (no configuration) runs as users start it, ``python spaces/hf-residual-demo/app.py`` from
the repository, with a HOME outside the temp directory and outside the repository: gradio serves files from
both without being told, which hid that the default mode's figure (under ``~/.cache``) could not be served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gradio
import gradio_client
import pytest
from helpers import bits, load_tensors, reference_port

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "spaces" / "hf-residual-demo"


def load_space_app():
    """Import the Space's app.py from its folder (the Space is not a package) under a unique name."""
    name = "hf_residual_space_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SPACE / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if str(SPACE) not in sys.path:
    sys.path.insert(0, str(SPACE))
import residual_space as rs  # noqa: E402  (the app's own module, from the Space folder)


def launch_space(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """Build the app on the toy family under ``workdir`` and serve it on 127.0.0.1; returns the Blocks."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(rs.CACHE_ENV, str(workdir))
    monkeypatch.delenv(rs.CONFIG_ENV, raising=False)
    app = load_space_app()
    demo = app.build_app(rs.toy_config(workdir))
    demo.launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, ssr_mode=False, quiet=True
    )
    assert demo.local_url.startswith("http://127.0.0.1:")
    return demo


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        demo = launch_space(tmp_path_factory.mktemp("space"), monkeypatch)
        yield demo
        demo.close()


@pytest.fixture(scope="module")
def client(space):
    return gradio_client.Client(space.local_url, verbose=False)


def _text(message: dict) -> str:
    """The text of a chat message as gradio returns it (a string, or a list of typed parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _chat(client, prompt: str, models: list[str], max_new_tokens: int = 12):
    slots = (models + ["", "", ""])[:3]
    result = client.predict(prompt, *slots, max_new_tokens, 0.0, 0.95, 0, api_name="/chat")
    return result[:3], result[3]


def test_space_files_are_a_deployable_space():
    front = (SPACE / "README.md").read_text().split("---")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"].split(".")[0] == gradio.__version__.split(".")[0]
    requirements = (SPACE / "requirements.txt").read_text()
    assert "hf-residual" in requirements and "torch==" in requirements


def test_api_lists_the_three_tabs_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/port", "/results", "/clear"} <= set(endpoints)


def test_a_chat_turn_to_each_model_returns_text(client):
    client.predict(api_name="/clear")
    chats, cleared_prompt = _chat(client, "Answer in upper case: hello", ["instruct", "cpt", "ported"])
    assert cleared_prompt == ""
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert _text(chat[0]) == "Answer in upper case: hello"
        assert _text(chat[1]).strip(), "a model returned no text"
    # The fourth model, alone in slot 1; the empty slots keep their (empty) history.
    chats, _ = _chat(client, "hi", ["base"])
    assert _text(chats[0][-1]).strip()
    # Greedy decoding: the same prompt to the same model gives the same reply.
    client.predict(api_name="/clear")
    again, _ = _chat(client, "Answer in upper case: hello", ["instruct"])
    first, _ = _chat(client, "Answer in upper case: hello", ["", "", "instruct"])
    assert _text(again[0][-1]) == _text(first[2][-1])


def test_sampling_settings_reach_generation(client):
    client.predict(api_name="/clear")  # both slots start from the same (empty) history
    result = client.predict("hello", "ported", "", "", 6, 0.9, 0.8, 7, api_name="/chat")
    sampled = _text(result[0][-1])
    again = client.predict("hello", "", "ported", "", 6, 0.9, 0.8, 7, api_name="/chat")
    assert sampled.strip() and _text(again[1][-1]) == sampled  # same seed, same sample


def test_side_by_side_streams_and_one_broken_model_does_not_stop_the_others(space, tmp_path):
    config = rs.toy_config(rs.default_cache_dir())
    store = rs.ModelStore(config)
    store.add(rs.ModelEntry("broken", str(tmp_path), "an empty folder"))
    turn = [{"role": "user", "content": "hello"}]
    snapshots = list(
        rs.stream_side_by_side(
            store, [turn, None, turn], ["instruct", None, "broken"], rs.Sampling(max_new_tokens=8)
        )
    )
    final = snapshots[-1]
    assert final[0].strip() and final[1] is None
    assert final[2].startswith("[error: ") and "Error" in final[2]
    assert len(snapshots) >= 2 and snapshots[0] != final  # replies are shown while they are generated


def test_unknown_model_is_a_clear_error(client):
    with pytest.raises(Exception, match="unknown model 'nope'"):
        _chat(client, "hi", ["nope"])


def test_port_tab_produces_a_model_that_chats(client, space, tmp_path):
    status, *pickers = client.predict("instruct", "base", "cpt", 0.5, api_name="/port")
    assert "Ported **cpt+residual-a0.5**" in status
    name = "cpt+residual-a0.5"
    assert pickers[2]["value"] == name
    folder = Path(status.split("Saved in `")[1].split("`")[0])
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))

    # It really is cpt + 0.5 * (instruct - base), every tensor bit for bit: float32 math, one rounding.
    root = folder.parents[1] / "toy"
    base, instruct, cpt = (load_tensors(root / k) for k in ("base", "instruct", "cpt"))
    ported = load_tensors(folder)
    assert ported.keys() == cpt.keys()
    for key, tensor in ported.items():
        expected = reference_port(cpt[key], instruct[key], base[key], 0.5)
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, key
        assert bits(tensor).equal(bits(expected)), f"{key} differs from the float32 reference"
    assert not bits(ported["model.layers.0.mlp.down_proj.weight"]).equal(
        bits(cpt["model.layers.0.mlp.down_proj.weight"])
    )

    chats, _ = _chat(client, "hello", ["", "", name])
    assert _text(chats[2][-1]).strip()


def test_results_tab_shows_an_empty_state_for_the_toy_family(client):
    note, table, plots = client.predict(api_name="/results")
    text = note["value"] if isinstance(note, dict) else note
    assert "No results yet" in text and "hf-residual demo" in text


def test_prompts_use_each_models_chat_template(space):
    store = rs.ModelStore(rs.toy_config(rs.default_cache_dir()))
    messages = [{"role": "user", "content": "hello"}]
    instruct_model, instruct_tok = store.get("instruct")
    cpt_model, cpt_tok = store.get("cpt")
    with_template = instruct_tok.decode(rs.prompt_ids(instruct_tok, messages)["input_ids"][0])
    plain = cpt_tok.decode(rs.prompt_ids(cpt_tok, messages)["input_ids"][0])
    assert with_template.endswith("<|user|>hello<|eot|><|assistant|>")
    assert "<|user|>" not in plain and plain.endswith("hello")
    assert rs.template_note(store.entry("instruct")) == "chat template"
    assert rs.template_note(store.entry("cpt")).startswith("no chat template")


# ---------------------------------------------------------------------------------------------- config


def test_config_file_maps_names_to_folders_and_repo_ids(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "results.json").write_text(json.dumps({"rows": [{"model": "mine", "if_strict": 0.5}]}))
    config_file = tmp_path / "space.yaml"
    config_file.write_text(
        "models:\n"
        "  mine: {path: models/mine, role: CPT'd base + residual}\n"
        "  hub: my-org/my-model@main\n"
        "results: [results.json]\n"
        "chat: [hub, mine]\n"
    )
    config = rs.load_config(config_file)
    assert config.models["mine"].ref == str((tmp_path / "models" / "mine").resolve())
    assert config.models["mine"].label == "mine (CPT'd base + residual)"
    assert config.models["hub"].ref == "my-org/my-model@main"
    assert config.chat_defaults == ["hub", "mine"]
    found = rs.load_results(config)
    assert found.rows == [{"model": "mine", "if_strict": 0.5}]
    plot = rs.plot_rows(found.rows, tmp_path / "plot.png")
    assert plot == tmp_path / "plot.png" and plot.read_bytes().startswith(b"\x89PNG")
    assert plot.stat().st_size > 1000


def test_bare_json_mapping_and_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    config_file = tmp_path / "space.json"
    config_file.write_text(json.dumps({"a": "a", "b": "org/b"}))
    monkeypatch.setenv(rs.CONFIG_ENV, str(config_file))
    config = rs.load_config()
    assert list(config.models) == ["a", "b"] and config.chat_defaults == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("models:\n  x: ./missing-folder\n", "neither a folder"),
        ("models:\n  x: {role: base}\n", "needs a folder or Hub repo id"),
        ("[1, 2]\n", "must hold a mapping"),
        ("models:\n  x: org/x\nchat: [y]\n", "unknown models"),
        ("models: {x: org/x\n", "not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    from hf_residual.errors import ResidualError

    config_file = tmp_path / "space.yaml"
    config_file.write_text(text)
    with pytest.raises(ResidualError, match=match):
        rs.load_config(config_file)


def test_missing_config_file_names_the_variable(tmp_path):
    from hf_residual.errors import ConfigError

    with pytest.raises(ConfigError, match=rs.CONFIG_ENV):
        rs.load_config(tmp_path / "nope.yaml")


def test_demo_output_folder_is_a_config(tmp_path):
    """A folder laid out as `hf-residual demo` writes it: models/<name>/ and results.json."""
    names = [
        "base",
        "instruct",
        "cpt-base-S",
        "cpt-instruct-S",
        "ported-S",
        "cpt-base-L",
        "cpt-instruct-L",
        "ported-L",
    ]
    for name in names:
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    rows = [{"model": n, "role": f"role of {n}", "if_strict": 0.1} for n in names if n != "ported-L"]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    config = rs.load_config(tmp_path)
    assert list(config.models) == names  # the results table's order; unlisted models last
    assert config.models["base"].role == "role of base"
    assert config.models["ported-L"].role == "CPT'd base + residual"
    assert config.chat_defaults == ["instruct", "cpt-instruct-L", "ported-L"]
    assert rs.load_results(config).rows[0]["if_strict"] == 0.1
    assert rs.guess_port_roles(list(config.models)) == ("instruct", "base", "cpt-base-L")


def test_results_from_model_card_eval_results(tmp_path):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = tmp_path / "ported"
    folder.mkdir()
    data = ModelCardData(
        model_name="ported",
        eval_results=[EvalResult("text-generation", "ifeval", "IFEval", "prompt_level_strict_acc", 0.42)],
    )
    ModelCard.from_template(data).save(folder / "README.md")
    config = rs.SpaceConfig({"ported": rs.ModelEntry("ported", str(folder), "ported")}, [], tmp_path)
    found = rs.load_results(config)
    assert found.rows == [{"model": "ported", "role": "ported", "IFEval prompt_level_strict_acc": 0.42}]
    assert found.sources == [f"{folder}/README.md"]


def test_results_tab_shows_the_table_and_a_plot(space, tmp_path, monkeypatch, recwarn):
    """A second app on the same toy models, with a results file (the rows `hf-residual demo` writes).

    gradio's queue statistics (gradio/queueing.py, after every event) use pandas options deprecated in
    pandas 3 (Pandas4Warning): the app filters them, a user cannot act on them."""
    rows = [
        {"model": "instruct", "role": "instruct", "if_strict": 0.5, "know_b": 0.1},
        {"model": "ported", "role": "CPT'd base + residual", "if_strict": 0.4, "know_b": 0.6},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    toy = rs.toy_config(rs.default_cache_dir())
    config = rs.SpaceConfig(toy.models, [tmp_path / "results.json"], tmp_path, ["instruct", "ported"])
    demo = load_space_app().build_app(config)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        note, table, plot = gradio_client.Client(demo.local_url, verbose=False).predict(api_name="/results")
    finally:
        demo.close()
    assert "results.json" in (note["value"] if isinstance(note, dict) else note)
    table = table.get("value", table)
    assert table["headers"] == ["model", "role", "if_strict", "know_b"]
    assert [r[0] for r in table["data"]] == ["instruct", "ported"]
    image = plot["value"] if isinstance(plot, dict) and "value" in plot else plot
    assert image and Path(image if isinstance(image, str) else image["path"]).stat().st_size > 1000
    gradios = [str(w.message) for w in recwarn if w.filename.endswith(os.path.join("gradio", "queueing.py"))]
    assert gradios == []


def test_startup_in_the_background_reports_its_progress_and_failure(monkeypatch):
    """The default mode's start-up thread: its latest log line is the page's status; a failure is shown."""
    lines: list[str] = []

    def fails(log):
        log("hf-residual Space: training the tiny family ...")
        raise rs.ConfigError("no space left on device")

    monkeypatch.setattr(rs, "load_config", fails)
    startup = rs.Startup(log=lines.append).start()
    assert not startup.wait(timeout=30) and startup.done and not startup.ready
    assert startup.status() == "**Could not prepare the models**: ConfigError: no space left on device"
    assert lines == [
        "hf-residual Space: training the tiny family ...",
        "hf-residual Space: could not prepare the models: ConfigError: no space left on device",
    ]


def test_a_tqdm_bar_made_before_the_app_still_closes(tmp_path):
    """gradio's tqdm tracking (the Port tab's progress) patches tqdm for the whole process; a bar made before
    the app (here; in the Space, by the start-up thread) must still close and be collected without error."""
    script = f"""
import gc, sys, warnings
sys.path.insert(0, {str(SPACE)!r})
from tqdm.auto import tqdm
early, late = tqdm(total=3, disable=True), tqdm(total=3, file=sys.stderr)
import residual_space as rs
import app
app.build_app(rs.SpaceConfig({{"m": rs.ModelEntry("m", "org/m")}}, [], __import__("pathlib").Path({str(tmp_path)!r})))
unraisable = []
sys.unraisablehook = unraisable.append
early.close(); late.update(3); late.close()
del early, late
gc.collect()
assert not unraisable, [u.exc_value for u in unraisable]
print("closed")
"""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------------- default mode, as users run it


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def outside_home() -> Path:
    """A new, empty HOME outside the temp directory and the repository (gradio serves files from both)."""
    for parent in (Path.home(), ROOT.parent):
        served_anyway = _inside(parent, Path(tempfile.gettempdir())) or _inside(parent, ROOT)
        if parent.is_dir() and os.access(parent, os.W_OK) and not served_anyway:
            return Path(tempfile.mkdtemp(prefix=".hf-residual-space-test-", dir=parent))
    pytest.fail(f"no writable folder outside {tempfile.gettempdir()} and {ROOT} for the app's HOME")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DefaultSpace:
    """``python spaces/hf-residual-demo/app.py`` from the repository, no configuration, a fresh HOME outside the
    temp directory and the repository: the first start trains the tiny family into ``~/.cache``."""

    def __init__(self):
        self.home = outside_home()
        self.cache = self.home / ".cache" / "hf-residual" / "space"
        self.log = self.home / "app.log"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/"
        env = {k: v for k, v in os.environ.items() if k not in (rs.CONFIG_ENV, rs.CACHE_ENV, "HF_HOME")}
        env.update(
            HOME=str(self.home),
            HF_HUB_OFFLINE="1",
            GRADIO_ANALYTICS_ENABLED="False",
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(port),
            PYTHONUNBUFFERED="1",
        )
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str((SPACE / "app.py").relative_to(ROOT))],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    def client(self) -> gradio_client.Client:
        """A client that waits for a server slowed down by the training thread (and a busy machine)."""
        return gradio_client.Client(self.url, verbose=False, httpx_kwargs={"timeout": 120})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_served(self, timeout: float = 240) -> None:
        """Until the page answers (the server starts while the tiny family trains)."""
        while time.monotonic() - self.started < timeout:
            assert self.process.poll() is None, f"the app exited:\n{self.output()}"
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the app did not answer in {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.home, ignore_errors=True)


_DEFAULT_SPACE: list[DefaultSpace] = []


def start_default_space(request: pytest.FixtureRequest) -> DefaultSpace:
    """One default-mode app for the session, shared by this module and test_space_browser.py; stopped and its
    HOME removed at the end of the session (``request`` is a session-scoped fixture's)."""
    if not _DEFAULT_SPACE:
        space = DefaultSpace()
        _DEFAULT_SPACE.append(space)
        request.addfinalizer(space.stop)
        space.wait_until_served()
    return _DEFAULT_SPACE[0]


@pytest.fixture(scope="session")
def default_space(request) -> DefaultSpace:
    return start_default_space(request)


def _value(update):
    return update.get("value") if isinstance(update, dict) else update


def wait_for_results(client, timeout: float = 400):
    """The /results endpoint once the models are ready (before, it says that they are not)."""
    started = time.monotonic()
    while True:
        note, table, plot = client.predict(api_name="/results")
        if "not ready yet" not in _value(note):
            return note, table, plot
        assert time.monotonic() - started < timeout, "the tiny family was not ready in time"
        time.sleep(2)


def test_default_mode_says_it_trains_then_shows_the_results_and_the_figure(default_space):
    """No configuration, HOME outside the temp dir and the repository: the console and the page say that the
    tiny family is training; then the Results tab shows its table and its figure (read from ``~/.cache``)."""
    client = default_space.client()
    results_file = default_space.cache / "demo-tiny" / "results.json"
    if not results_file.is_file():  # still training (about 20 s or more): the page says so
        note, table, plot = client.predict(api_name="/results")
        text = _value(note)
        assert results_file.is_file() or "not ready yet" in text, text  # (or it just finished)
        assert results_file.is_file() or "Training the tiny family" in text, text
        try:  # a chat turn meanwhile is a clear error (no models yet)
            _chat(client, "hi", ["instruct"], max_new_tokens=2)
        except Exception as error:
            assert "Training the tiny family" in str(error), error
        else:
            assert results_file.is_file(), "a chat turn worked before the models were ready"
    note, table, plot = wait_for_results(client)
    output = default_space.output()
    assert "training the tiny family" in output and "first start" in output, output
    assert "is ready" in output, output
    assert output.index("training the tiny family") < output.index("is ready")
    # No error but the chat turn refused above (gradio logs its traceback): no InvalidPathError, no failed start.
    errors = [line for line in output.splitlines() if re.match(r"[\w.]+(Error|Exception): ", line)]
    assert all(line.startswith("gradio.exceptions.Error: ") for line in errors), output
    assert "InvalidPathError" not in output and "could not prepare" not in output, output

    figure = default_space.cache / "demo-tiny" / "figure.png"
    assert "results.json" in _value(note) and str(figure) in _value(note)
    table = _value(table)
    assert table["headers"][:2] == ["model", "role"]
    assert {"base", "instruct", "ported-S"} <= {row[0] for row in table["data"]}
    shown = _value(plot)
    shown = Path(shown if isinstance(shown, str) else shown["path"])
    assert shown.read_bytes() == figure.read_bytes()  # the figure itself, served through gradio's cache


def test_default_config_is_the_demo_tiny_family_and_its_models_chat(default_space, monkeypatch):
    """No configuration: the demo's tiny family (trained once into the cache by the default-mode app) is
    shown with its roles, and its models chat; a second start reuses it and says so."""
    wait_for_results(default_space.client())  # trained, so not trained twice
    monkeypatch.setenv(rs.CACHE_ENV, str(default_space.cache))
    monkeypatch.delenv(rs.CONFIG_ENV, raising=False)
    lines: list[str] = []
    config = rs.load_config(log=lines.append)
    assert lines[0].startswith("hf-residual Space: checking the tiny family") and "reused" in lines[0]
    assert "is ready" in lines[-1]
    roles = {name: entry.role for name, entry in config.models.items()}
    assert roles["instruct"] == "instruct" and roles["base"] == "base"
    assert [roles[name] for name in config.chat_defaults] == [
        "instruct",
        "CPT'd instruct",
        "CPT'd base + residual",
    ]
    assert any(path.name == "results.json" for path in config.results)
    store = rs.ModelStore(config)
    turn = [{"role": "user", "content": "Answer in upper case: where does the first entity live?"}]
    final = list(
        rs.stream_side_by_side(store, [turn] * 3, config.chat_defaults, rs.Sampling(max_new_tokens=12))
    )[-1]
    assert all(reply and not reply.startswith("[error") for reply in final)


def test_models_of_one_turn_load_one_at_a_time(monkeypatch, tmp_path):
    """The first turn needs every model at once, but from_pretrained is not thread-safe: three loads in
    parallel threads left transformers unable to tie a Qwen2 model's embeddings loaded later in the process
    (seen when tests/test_vocab.py ran after this file). Loads are serialised; generation stays parallel."""
    import threading
    import time

    active, most = [0], [0]
    guard = threading.Lock()

    def slow_load(ref: str):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        with guard:
            active[0] -= 1
        raise RuntimeError("not loaded")  # each panel shows the error; the others go on

    monkeypatch.setattr(rs, "_load", slow_load)
    store = rs.ModelStore(rs.toy_config(tmp_path / "space"))
    names = store.names()[:3]
    replies = list(
        rs.stream_side_by_side(store, [[{"role": "user", "content": "hi"}]] * 3, names, rs.Sampling())
    )
    assert len(names) == 3 and replies
    assert most[0] == 1
