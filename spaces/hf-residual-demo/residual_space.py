"""Everything the hf-residual Space does except the page layout: which models it shows, loading them
lazily, streaming several generations at once, reading results, and running a port.

Kept apart from ``app.py`` so it can be tested and reused without building the page. Model references
come from a config file (``HF_RESIDUAL_SPACE_MODELS``); without one, the tiny family of ``hf-residual demo``
is trained once on CPU (``Startup`` does it in the background, so the page is served meanwhile), so the
Space starts with no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hf_residual.errors import ConfigError, InputNotFoundError

CONFIG_ENV = "HF_RESIDUAL_SPACE_MODELS"
CACHE_ENV = "HF_RESIDUAL_SPACE_CACHE"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
TINY_FAMILY = "the tiny family of `hf-residual demo`"
console = partial(print, flush=True)  # the Space's log: shown live in the Space's logs and in a terminal


@dataclass(frozen=True)
class ModelEntry:
    """One model the Space can chat with: a name shown to users, a folder or Hub repo id, a role."""

    name: str
    ref: str
    role: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role})" if self.role else self.name


@dataclass
class SpaceConfig:
    """The models to show, the results files to read, and where to write built or ported models."""

    models: dict[str, ModelEntry]
    results: list[Path] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: default_cache_dir())
    chat_defaults: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf-residual" / "space")


def load_config(path: str | Path | None = None, log: Callable[[str], None] = console) -> SpaceConfig:
    """The Space's config: ``path``, else ``$HF_RESIDUAL_SPACE_MODELS``, else the demo's tiny family
    (trained on the first start, which ``log`` reports).

    The file is YAML or JSON: ``{models: {name: ref | {path, role}}, results: [files], chat: [names]}``,
    or a bare ``{name: ref}`` mapping. A ref is a folder (relative to the file) or a Hub repo id. A folder
    written by ``hf-residual demo`` (with ``models/`` and ``results.json``) can be given directly.
    """
    raw = path or os.environ.get(CONFIG_ENV)
    if not raw:
        return demo_config(default_cache_dir(), log)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _demo_output_config(path)
    if not path.is_file():
        raise ConfigError(
            f"{CONFIG_ENV} points to {path}, which does not exist: give a YAML/JSON file mapping model names to "
            "folders or Hub repo ids, or a folder written by `hf-residual demo`"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML or JSON: {error}") from error
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path} must hold a mapping of model names to folders or Hub repo ids")
    models_raw = data.get("models", data) if "models" in data else data
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError(f"{path}: `models` must map model names to folders or Hub repo ids")
    models = {}
    for name, value in models_raw.items():
        spec = value if isinstance(value, dict) else {"path": value}
        if not isinstance(spec.get("path"), str):
            raise ConfigError(f"{path}: model {name!r} needs a folder or Hub repo id (a string, or `path:`)")
        models[str(name)] = ModelEntry(
            str(name), _resolve_ref(spec["path"], path.parent), str(spec.get("role", ""))
        )
    results = [_resolve_file(r, path.parent) for r in data.get("results", [])] if "models" in data else []
    chat = [str(n) for n in data.get("chat", [])] if "models" in data else []
    unknown = [n for n in chat if n not in models]
    if unknown:
        raise ConfigError(f"{path}: `chat` names unknown models {unknown}; known: {sorted(models)}")
    workdir = Path(data.get("workdir", default_cache_dir())) if "models" in data else default_cache_dir()
    return SpaceConfig(models, results, workdir, chat or list(models)[:3])


def _resolve_ref(ref: str, root: Path) -> str:
    local = (root / ref).expanduser()
    if local.exists():
        return str(local.resolve())
    if _REPO_ID.match(ref) and not ref.startswith((".", "/")):
        return ref
    raise InputNotFoundError(
        f"model {ref!r} is neither a folder (relative to {root}) nor a Hub repo id (org/name)"
    )


def _resolve_file(ref: str, root: Path) -> Path:
    local = (root / ref).expanduser()
    if not local.is_file():
        raise InputNotFoundError(f"results file {local} does not exist: fix `results` in the Space config")
    return local.resolve()


def _demo_output_config(folder: Path) -> SpaceConfig:
    """Models and results of a folder written by ``hf-residual demo``, in its results table's order."""
    models_dir = folder / "models"
    found = (
        {p.name: p for p in sorted(models_dir.glob("*")) if (p / "config.json").is_file()}
        if models_dir.is_dir()
        else {}
    )
    if not found:
        raise ConfigError(
            f"{folder} has no models/<name>/config.json: run `hf-residual demo -o {folder}` first"
        )
    results = [p for p in (folder / "results.json", folder / "figure.png") if p.is_file()]
    rows = (
        json.loads(results[0].read_text()).get("rows", []) if results and results[0].suffix == ".json" else []
    )
    roles = {r.get("model"): str(r.get("role", "")) for r in rows if isinstance(r, dict)}
    order = [n for n in roles if n in found] + [n for n in found if n not in roles]
    models = {n: ModelEntry(n, str(found[n].resolve()), roles.get(n) or _demo_role(n)) for n in order}
    # The paper's comparison at the largest CPT budget: instruct, CPT'd instruct, CPT'd base + residual.
    last = {
        p: next((n for n in reversed(order) if n.startswith(p)), None) for p in ("cpt-instruct", "ported")
    }
    chat = [n for n in ("instruct", last["cpt-instruct"], last["ported"]) if n] or order[:3]
    return SpaceConfig(models, results, default_cache_dir(), chat)


def _demo_role(name: str) -> str:
    prefixes = (
        ("cpt-base", "CPT'd base"),
        ("cpt-instruct", "CPT'd instruct"),
        ("ported", "CPT'd base + residual"),
    )
    for prefix, role in prefixes:
        if name.startswith(prefix):
            return role
    return {"base": "base", "instruct": "instruct"}.get(name, "")


def demo_config(workdir: Path, log: Callable[[str], None] = console) -> SpaceConfig:
    """The offline default: the ``tiny`` family of ``hf-residual demo`` (trained on CPU in about 20 s on the
    first start, reused after), whose instruct and ported models really follow format instructions.

    ``log`` gets a line when it starts (saying whether it trains), each stage of the demo, and one when done.
    """
    from hf_residual.demo import run_demo

    folder = demo_folder(workdir)
    with _BUILD_LOCK:
        started = time.perf_counter()
        if is_trained(folder):
            log(f"hf-residual Space: checking {TINY_FAMILY} in {folder} (built before: reused) ...")
        else:
            log(
                f"hf-residual Space: training {TINY_FAMILY} in {folder} "
                "(first start: about 20 s on CPU, nothing downloaded; reused after) ..."
            )
        run_demo(folder, profile="tiny", seed=0, log=lambda line: log(f"  {line.strip()}"))
        config = _demo_output_config(folder)
        log(f"hf-residual Space: {TINY_FAMILY} is ready ({time.perf_counter() - started:.0f} s)")
    return config


def demo_folder(workdir: Path) -> Path:
    """Where the default mode trains and keeps the tiny family."""
    return Path(workdir) / "demo-tiny"


def is_trained(folder: Path) -> bool:
    """Whether ``hf-residual demo`` already ran to the end in ``folder`` (its report is written last)."""
    return (Path(folder) / "results.json").is_file()


class Startup:
    """The Space's config and models, made ready in a background thread when that takes a while (the default
    tiny family is trained on the first start), so the page is served at once and says what is happening.

    ``Startup(config)`` is ready at once; ``Startup().start()`` loads the default config in a thread.
    """

    def __init__(self, config: SpaceConfig | None = None, log: Callable[[str], None] = console):
        self.config = config
        self.store = ModelStore(config) if config is not None else None
        self.error: str | None = None
        self.line = ""  # the latest line logged while preparing
        self.background = False
        self.first_start = False
        self._log = log
        self._done = threading.Event()
        if config is not None:
            self._done.set()

    def start(self) -> Startup:
        self.background = True
        self.first_start = not os.environ.get(CONFIG_ENV) and not is_trained(demo_folder(default_cache_dir()))
        threading.Thread(target=self._prepare, name="hf-residual-space-startup", daemon=True).start()
        return self

    def _prepare(self) -> None:
        try:
            config = load_config(log=self.log)
            self.config = config
            self.store = ModelStore(config)  # last: ``ready`` from here on
        except Exception as error:  # shown on the page and in the log; the server stays up to show it
            self.error = f"{type(error).__name__}: {error}"
            self.log(f"hf-residual Space: could not prepare the models: {self.error}")
        finally:
            self._done.set()

    def log(self, line: str) -> None:
        self.line = line.strip()
        self._log(line)

    @property
    def done(self) -> bool:
        """Ready, or failed (``error`` says why)."""
        return self._done.is_set()

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self.store is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout) and self.ready

    def status(self) -> str:
        """A Markdown line for the page: training (and the current stage), ready, or failed."""
        if self.error:
            return f"**Could not prepare the models**: {self.error}"
        if not self.ready:
            now = f" Now: `{self.line.removeprefix('hf-residual Space: ') or 'starting'}`"
            if self.first_start:
                return (
                    f"**Training {TINY_FAMILY}** on CPU (first start: about 20 s, nothing downloaded; reused "
                    f"after). The models appear here when it is done.{now}"
                )
            return f"**Loading {TINY_FAMILY}** (trained before: reused).{now}"
        if self.background:
            return f"**Models ready**: {TINY_FAMILY}, in `{self.config.workdir}`."
        return ""


def toy_config(workdir: Path) -> SpaceConfig:
    """The offline default: a tiny toy family (base, instruct, cpt) and its port, built once under ``workdir``."""
    root = build_toy_family(workdir)
    models = {
        "instruct": ModelEntry("instruct", str(root / "instruct"), "instruct"),
        "cpt": ModelEntry("cpt", str(root / "cpt"), "CPT'd base"),
        "ported": ModelEntry("ported", str(root / "ported"), "CPT'd base + residual"),
        "base": ModelEntry("base", str(root / "base"), "base"),
    }
    return SpaceConfig(models, [], workdir, ["instruct", "cpt", "ported"])


_BUILD_LOCK = threading.Lock()


def build_toy_family(workdir: Path) -> Path:
    """Build (once; reused when its marker exists) the toy family and the port of its residual onto cpt.

    Toy models are random inits, so their replies are gibberish: they show the plumbing, not quality.
    """
    from hf_residual import api
    from hf_residual.toy import build_family

    root = Path(workdir) / "toy"
    marker = root / "built.json"
    with _BUILD_LOCK:
        if marker.is_file():
            return root
        staging = root.with_name("toy.partial")
        shutil.rmtree(staging, ignore_errors=True)
        family = build_family(staging, "llama", "bfloat16")
        api.port(family.instruct, family.cpt, staging / "ported", base=family.base, progress=False)
        (staging / "built.json").write_text(json.dumps({"family": "toy llama bfloat16"}))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root


class ModelStore:
    """The models of a config, loaded on first use and kept; ported models are added at run time."""

    def __init__(self, config: SpaceConfig):
        self.config = config
        self._entries = dict(config.models)
        self._loaded: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def entry(self, name: str) -> ModelEntry:
        with self._lock:
            if name not in self._entries:
                raise ConfigError(f"unknown model {name!r}; pick one of {', '.join(self._entries)}")
            return self._entries[name]

    def add(self, entry: ModelEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    def get(self, name: str):
        """``(model, tokenizer)`` of ``name``, loading it once.

        Loads run one at a time (``_LOAD_LOCK``): transformers' ``from_pretrained`` is not thread-safe.
        Three models loaded in parallel threads left the process unable to tie embeddings of models loaded
        later (a tied Qwen2 came back with an untied, uninitialised ``lm_head``). Generation stays parallel.
        """
        entry = self.entry(name)
        with self._lock:
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._loaded:
                with _LOAD_LOCK:
                    self._loaded[name] = _load(entry.ref)
            return self._loaded[name]


_IMPORT_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()  # see ModelStore.get


def _model_libraries():
    """torch and the transformers auto classes, imported once under a lock: transformers' lazy imports
    are not thread-safe, and the first chat turn loads several models in parallel threads."""
    with _IMPORT_LOCK:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

    return torch, AutoModelForCausalLM, AutoTokenizer


def _load(ref: str):
    torch, AutoModelForCausalLM, AutoTokenizer = _model_libraries()

    repo, _, revision = ref.partition("@") if not Path(ref).exists() else (ref, "", "")
    kwargs = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(repo, **kwargs)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, **kwargs)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class Sampling:
    """Generation settings shared by every model of one turn; temperature 0 means greedy."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, messages: list[dict]):
    """Token ids of a conversation: the model's chat template, or plain text for models without one."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")


class _Collector:
    """A transformers streamer that keeps the decoded reply so far (the first ``put`` is the prompt)."""

    def __init__(self):
        self.tokenizer = None
        self.ids: list[int] = []
        self.text = ""
        self.error: str | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def end(self) -> None:
        pass


def _generate(
    store: ModelStore, name: str, messages: list[dict], sampling: Sampling, collector: _Collector
) -> None:
    torch = _model_libraries()[0]
    try:
        model, tokenizer = store.get(name)
        collector.tokenizer = tokenizer
        inputs = prompt_ids(tokenizer, messages).to(model.device)
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        kwargs = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                pad_token_id=pad,
                streamer=collector,
                **kwargs,
            )
    except Exception as error:  # shown in that model's panel; the other models go on
        collector.error = f"{type(error).__name__}: {error}"


def stream_side_by_side(
    store: ModelStore, conversations: list[list[dict] | None], names: list[str | None], sampling: Sampling
) -> Iterator[list[str | None]]:
    """Generate for every named model at once (one thread each); yield all replies so far, then the final ones.

    ``conversations[i]`` is model i's history including the new user message; a ``None`` name is skipped
    and yields ``None``. Errors become the text of that model's reply, marked as such.
    """
    _model_libraries()
    collectors = [_Collector() if name else None for name in names]
    threads = []
    for name, messages, collector in zip(names, conversations, collectors, strict=True):
        if collector is not None:
            thread = threading.Thread(
                target=_generate, args=(store, name, messages, sampling, collector), daemon=True
            )
            thread.start()
            threads.append(thread)

    def snapshot() -> list[str | None]:
        return [None if c is None else (f"[error: {c.error}]" if c.error else c.text) for c in collectors]

    while any(t.is_alive() for t in threads):
        yield snapshot()
        time.sleep(0.1)
    yield snapshot()


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Results:
    """What the Results tab shows: one row per model, plot images, and where it all came from."""

    rows: list[dict]
    images: list[Path]
    sources: list[str]


def load_results(config: SpaceConfig, store: ModelStore | None = None) -> Results:
    """Rows from results JSON files (``rows`` lists as ``hf-residual demo`` writes them) and from the
    ``model-index`` eval results of local model cards; images listed in the config."""
    rows: list[dict] = []
    images: list[Path] = []
    sources: list[str] = []
    for path in config.results:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".svg"):
            images.append(path)
            sources.append(str(path))
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            found = data.get("rows", []) if isinstance(data, dict) else data
            rows.extend(r for r in found if isinstance(r, dict))
            sources.append(str(path))
    if not rows:
        entries = [store.entry(n) for n in store.names()] if store else list(config.models.values())
        for entry in entries:
            card_row = _card_row(entry)
            if card_row:
                rows.append(card_row)
                sources.append(f"{entry.ref}/README.md")
    return Results(rows, images, sources)


def _card_row(entry: ModelEntry) -> dict | None:
    """One row from a local model card's ``model-index`` (name: value per task/dataset/metric)."""
    card_path = Path(entry.ref) / "README.md"
    if not card_path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(card_path)
    except Exception:  # a hand-written card without valid metadata has no results to show
        return None
    results = getattr(card.data, "eval_results", None) or []
    if not results:
        return None
    row: dict = {"model": entry.name, "role": entry.role}
    for result in results:
        column = " ".join(x for x in (result.dataset_name or result.dataset_type, result.metric_type) if x)
        row[column] = result.metric_value
    return row


# ------------------------------------------------------------------------------------------------- port


def run_port(
    store: ModelStore,
    instruct: str,
    base: str,
    target: str,
    alpha: float,
) -> ModelEntry:
    """Port ``target + alpha * (instruct - base)`` into the Space's work folder and register the result.

    The same inputs reuse their earlier output; progress goes through tqdm (the page shows it).
    """
    from hf_residual import api

    entries = {
        role: store.entry(name) for role, name in (("instruct", instruct), ("base", base), ("target", target))
    }
    key = hashlib.sha256(json.dumps([e.ref for e in entries.values()] + [alpha]).encode()).hexdigest()[:10]
    name = f"{target}+residual-a{alpha:g}"
    safe = re.sub(r"[^\w.-]", "_", name)
    output = store.config.workdir / "ported" / f"{safe}-{key}"
    if not (output / "config.json").is_file():
        api.port(
            entries["instruct"].ref,
            entries["target"].ref,
            output,
            base=entries["base"].ref,
            alpha=alpha,
            overwrite=True,
            progress=True,
        )
    entry = ModelEntry(name, str(output), f"{target} + {alpha:g} x ({instruct} - {base}), ported here")
    store.add(entry)
    return entry


def guess_port_roles(names: list[str]) -> tuple[str | None, str | None, str | None]:
    """Default instruct, base and target picks from model names (instruct, base, a CPT'd base)."""

    def first(pred: Callable[[str], bool]) -> str | None:
        return next((n for n in names if pred(n)), None)

    instruct = first(lambda n: n == "instruct") or first(lambda n: "instruct" in n and "cpt" not in n)
    base = first(lambda n: n == "base")
    last_cpt_base = next((n for n in reversed(names) if n.startswith("cpt-base")), None)  # the longest CPT
    target = first(lambda n: n == "cpt") or last_cpt_base or first(lambda n: "cpt" in n)
    return instruct, base, target


def template_note(entry: ModelEntry) -> str:
    """Whether a local model has a chat template (prompts go through it) or gets plain text."""
    folder = Path(entry.ref)
    if not folder.is_dir():
        return "Hub model"
    config = folder / "tokenizer_config.json"
    has = (folder / "chat_template.jinja").is_file() or (
        config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
    )
    return "chat template" if has else "no chat template: plain-text prompt"


def plot_rows(rows: list[dict], path: Path) -> Path | None:
    """A grouped bar chart of the numeric columns per model, or None without matplotlib or numbers."""
    columns = [
        k for k in rows[0] if k != "cpt_tokens" and all(isinstance(r.get(k), int | float) for r in rows)
    ]
    if not columns:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.5))
    for i, column in enumerate(columns):
        ax.bar([x + i * width for x in range(len(rows))], [r[column] for r in rows], width, label=column)
    ax.set_xticks(
        [x + 0.4 - width / 2 for x in range(len(rows))], [str(r.get("model", "")) for r in rows], rotation=30
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
