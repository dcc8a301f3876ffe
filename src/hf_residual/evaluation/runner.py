"""Run lm-eval (``lm_eval.simple_evaluate``) on each model for each task of a suite; reuse finished results.

Each model is resolved once (a local folder, or a Hub repo pinned to its commit sha by
``hf_residual.hub.sources``), loaded once by lm-eval's ``hf`` (or ``vllm``) backend, and evaluated task by task so
that every task's results are stored as soon as they exist (``store.ResultsStore``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.core.assets import has_chat_template
from hf_residual.errors import ConfigError, InputNotFoundError, ResidualError
from hf_residual.evaluation.store import ModelRef, ResultsStore, result_key
from hf_residual.evaluation.suites import Suite, TaskSpec, shots

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HASHED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PUNKT_TASKS = ("hfr_if_offline",)


class EvalDataUnavailableError(ResidualError, ConnectionError):
    """A task's dataset could not be fetched (no network, or the Hub refused it)."""


class EvalBackendError(ResidualError, RuntimeError):
    """lm-eval is missing or failed on a model."""


@dataclass
class TaskRun:
    model: ModelRef
    task: TaskSpec
    path: Path
    reused: bool
    results: dict


@dataclass
class EvalRun:
    results_dir: Path
    runs: list[TaskRun] = field(default_factory=list)


def folder_sha(folder: Path) -> str:
    """sha256 of a local model's weights, config and tokenizer: the key of a folder without a Hub sha."""
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + [
        folder / n for n in HASHED_FILES if (folder / n).is_file()
    ]
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


def task_manager(extra: list[Path] | None = None, include_defaults: bool = True):
    """lm-eval's task registry with hf-residual's offline tasks added (building it takes seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise EvalBackendError(
            f"lm-eval is not installed ({error}); install the eval extra: pip install 'hf-residual[eval]'"
        ) from None
    paths = [str(TASKS_DIR), *(str(p) for p in extra or [])]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def check_tasks(suite: Suite, manager) -> None:
    import difflib

    known = set(manager.all_tasks)
    for spec in suite.tasks:
        if spec.task not in known:
            close = difflib.get_close_matches(spec.task, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"task {spec.task!r} is not in lm-eval's registry{hint}; `lm-eval ls tasks` lists them"
            )


def _data_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError]
    try:
        from huggingface_hub import errors as hf

        errors += [hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, hf.HfHubHTTPError]
    except ImportError:
        pass
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _unavailable(spec: TaskSpec, error: BaseException) -> EvalDataUnavailableError:
    return EvalDataUnavailableError(
        f"task {spec.task}: its dataset could not be fetched from the Hugging Face Hub "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). The paper and "
        "quick suites need the Hub's datasets (a network, or a filled datasets cache with HF_DATASETS_OFFLINE=1). "
        "Without network, use `--suite offline-if`, which runs on data shipped with hf-residual"
    )


def evaluate(
    models: list[str],
    suite: Suite,
    results_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: str | int = "auto",
    device: str | None = None,
    backend: str = "hf",
    chat_template: str = "auto",
    gen_kwargs: str | None = None,
    token: str | None = None,
    manager=None,
    log: Callable[[str], None] = lambda _: None,
) -> EvalRun:
    """Evaluate every model on every task of ``suite``; results already in ``results_dir`` are reused.

    Every model is resolved and checked (a model folder: config.json and valid safetensors weights) before
    the first one runs; a model is added to the folder with its first result, so a run that fails before
    any result leaves ``results_dir`` as it was.
    """
    if not models:
        raise ConfigError("give at least one model to evaluate (a local folder or a Hub repo id)")
    if chat_template not in ("auto", "yes", "no"):
        raise ConfigError(f"--chat-template {chat_template!r}: choose auto, yes or no")
    limit = limit if limit is not None else suite.limit
    store = ResultsStore(results_dir)
    manager = manager or task_manager(include_defaults=suite.needs_hub)
    check_tasks(suite, manager)
    run = EvalRun(Path(results_dir))
    resolved_models = [(ref, _resolve_model(ref, token)) for ref in models]  # all checked before any runs
    for ref, resolved in resolved_models:
        identity = resolved.identity
        sha = identity.revision if identity.repo_id else folder_sha(resolved.path)
        model = store.register(str(ref), sha, identity.repo_id, identity.name)
        use_chat = has_chat_template(resolved.path) if chat_template == "auto" else chat_template == "yes"
        lm = None
        for position, spec in enumerate(suite.tasks):
            settings = _settings(spec, limit, use_chat, backend, gen_kwargs)
            key = result_key(sha, settings)
            stored = store.load(model, spec.task, key)
            if stored is not None:
                log(f"{model.label} / {spec.task}: reusing {store.path(model, spec.task, key)}")
                run.runs.append(
                    TaskRun(model, spec, store.path(model, spec.task, key), True, stored["lm_eval"])
                )
                continue
            log(f"{model.label} / {spec.task}: running lm-eval ({shots(spec.num_fewshot)})")
            if lm is None:
                lm = _load_model(resolved.path, backend, batch_size, device)
            results = _run_task(lm, spec, limit, use_chat, gen_kwargs, manager)
            record = {
                "model": model.__dict__,
                "task": spec.to_dict(),
                "position": position,
                "suite": suite.name,
                "settings": settings,
                "lm_eval": results,
            }
            path = store.save(model, spec.task, key, record)
            run.runs.append(TaskRun(model, spec, path, False, results))
        del lm
    return run


def _resolve_model(ref: str, token: str | None):
    """``ref`` on local disk, refused unless it is a transformers model with valid safetensors weights."""
    from hf_residual.core.checkpoint import open_checkpoint
    from hf_residual.hub.sources import resolve

    resolved = resolve(ref, role="model", token=token)
    open_checkpoint(resolved.path)  # a folder with weights, every header valid; pickle-only folders refused
    if not (resolved.path / "config.json").is_file():
        raise InputNotFoundError(
            f"model {ref!r}: {resolved.path} has no config.json; is this a model folder? `hf-residual eval` "
            "needs a transformers model (config.json, tokenizer, *.safetensors weights)"
        )
    return resolved


def uses_punkt(spec: TaskSpec) -> bool:
    """Tasks whose scorer splits sentences with nltk's punkt: lm-eval's IFEval and our offline IF task
    (scored by IFEval's checkers, hf_residual.evaluation.verifiers)."""
    return "ifeval" in spec.task or spec.task in PUNKT_TASKS


def _settings(spec: TaskSpec, limit: int | None, chat: bool, backend: str, gen_kwargs: str | None) -> dict:
    from importlib.metadata import version

    settings = {
        "task": spec.task,
        "num_fewshot": spec.num_fewshot,
        "limit": limit,
        "apply_chat_template": chat,
        "backend": backend,
        "gen_kwargs": gen_kwargs or None,
        "lm_eval_version": version("lm_eval"),
    }
    if uses_punkt(spec):  # only there, so that other tasks keep the keys they had
        from hf_residual.evaluation.punkt import punkt_identity

        settings["punkt"] = punkt_identity()
    return settings


def _load_model(path: Path, backend: str, batch_size, device: str | None):
    from lm_eval.api.registry import get_model

    if backend not in ("hf", "vllm"):
        raise ConfigError(f"--backend {backend!r}: choose hf or vllm")
    if device is None and backend == "hf":  # lm-eval's hf backend assumes CUDA when no device is given
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"batch_size": batch_size, "device": device}
    try:
        cls = get_model(backend)
        return cls.create_from_arg_obj({"pretrained": str(path), "dtype": "auto"}, extra)
    except (ImportError, KeyError, ValueError, OSError) as error:  # a backend's package missing, a bad model
        raise EvalBackendError(f"lm-eval backend {backend!r} could not load {path} ({error})") from None


def _run_task(lm, spec: TaskSpec, limit: int | None, chat: bool, gen_kwargs: str | None, manager) -> dict:
    """One ``simple_evaluate`` call; lm-eval's results dict without the per-sample logs."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from hf_residual.evaluation.punkt import use_offline_punkt

    if uses_punkt(spec):
        use_offline_punkt()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[spec.task],
            num_fewshot=spec.num_fewshot,
            limit=limit,
            apply_chat_template=chat,
            gen_kwargs=gen_kwargs or None,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    except _data_errors() as error:
        raise _unavailable(spec, error) from None
    import json

    results.pop("samples", None)
    return json.loads(json.dumps(results, default=handle_non_serializable))
