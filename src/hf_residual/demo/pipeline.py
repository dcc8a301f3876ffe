"""The demo end to end: data, tokenizer, base, instruct, CPT'd models, ported models, evaluation, report.

Each model stage is cached in its folder (see ``cache``); porting goes through ``hf_residual.ops.port``,
the same engine users run. Times are measured per stage and returned with the results.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.demo import cache, docchat, evaluate, report, training, world
from hf_residual.demo.profiles import Profile, get_profile
from hf_residual.demo.tokenizer import build_tokenizer


@dataclass
class DemoResult:
    """What a demo run built and measured."""

    output: Path
    profile: str
    seed: int
    rows: list[dict]
    checks: list[dict]
    passed: bool
    timings: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # versions, CPU kernels, threads (report.environment)
    reused: list[str] = field(default_factory=list)  # model stages taken from their cached folders


class _Clock:
    """Times each stage and logs it; a stage whose models all came from their cached folders says so."""

    def __init__(self, log: Callable[[str], None]):
        self.timings: dict[str, float] = {}
        self.log = log
        self.reused: list[str] = []
        self._built: list[str] = []
        self._reused: list[str] = []

    def model(self, name: str, built: bool) -> None:
        """Record that the current stage built model ``name``, or reused it from its cached folder."""
        (self._built if built else self._reused).append(name)
        if not built:
            self.reused.append(name)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._built, self._reused = [], []
        self.log(f"[{name}] ...")
        yield
        seconds = time.perf_counter() - started
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        reused = f"reused cached {', '.join(self._reused)}" if self._reused else ""
        if reused and not self._built:
            self.log(f"[{name}] {reused} (nothing to train)")
        else:
            self.log(f"[{name}] done in {seconds:.1f} s" + (f"; {reused}" if reused else ""))


def _settings(profile: Profile, *names: str) -> dict:
    values = dataclasses.asdict(profile)
    return {n: values[n] for n in names}


def _cpt_batches(rows_b, rows_a, profile: Profile, steps: int, seed: int) -> list[dict]:
    """``steps`` batches of CPT rows, B in a reshuffled cycle, with a ``cpt_replay`` share of A rows.

    Built step by step from fixed generators, so the first n batches are the same whatever ``steps`` is:
    snapshots of one run equal shorter runs under a constant learning rate.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_a = round(profile.cpt_batch * profile.cpt_replay)
    n_b = profile.cpt_batch - n_a
    order_b: list[int] = []
    batches = []
    for _ in range(steps):
        while len(order_b) < n_b:
            order_b += torch.randperm(len(rows_b), generator=gen).tolist()
        take, order_b = order_b[:n_b], order_b[n_b:]
        chunk = rows_b[take]
        if n_a:
            chunk = torch.cat([chunk, rows_a[torch.randint(len(rows_a), (n_a,), generator=gen)]])
        batches.append({"input_ids": chunk, "labels": chunk})
    return batches


def _cpt_steps(profile: Profile, tokens: int) -> int:
    return max(1, tokens // (profile.cpt_batch * profile.seq_len))


@dataclass
class _Data:
    """The demo's fictional world, its tokenizer and the packed token rows of corpora A and B."""

    world: world.World
    tok: object
    rows_a: object
    rows_b: object
    key: str


class _Build:
    """The model stages of one demo run, in order; each built, or reused from its cached folder."""

    def __init__(self, prof: Profile, data: _Data, models: Path, seed: int, rebuild: bool, log, clock):
        self.prof, self.data, self.models = prof, data, models
        self.seed, self.rebuild, self.log, self.clock = seed, rebuild, log, clock
        self.keys: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.skill_task: Path | None = None  # the DocChat skill's lm-eval task folder (``derived``)
        self.recipe: dict | None = None  # the tuned recipe's port settings (``tuned``)

    def _stage(self, name: str, kind: str, settings: dict, *parents: str) -> bool:
        """Record stage ``name``'s cache key and folder; whether it must be built."""
        self.keys[name] = cache.key(kind, settings, *parents)
        self.paths[name] = self.models / name
        built = cache.needs_build(self.paths[name], self.keys[name], self.rebuild)
        self.clock.model(name, built)
        return built

    def base(self) -> None:
        prof, tok = self.prof, self.data.tok
        settings = _settings(
            prof, "shape", "seq_len", "batch_size", "pretrain_docs", "pretrain_epochs", "pretrain_lr"
        )
        with self.clock.stage("base pre-training"):
            if not self._stage("base", "base", settings, self.data.key):
                return
            model = training.new_model(prof.shape, tok, self.seed)
            batches = training.row_batches(self.data.rows_a, prof.batch_size, prof.pretrain_epochs, self.seed)
            steps = len(batches)
            losses = training.train(model, batches, training.Schedule(prof.pretrain_lr, max(1, steps // 20)))
            training.save_model(model, tok, self.paths["base"], chat=False)
            info = {
                "steps": steps,
                "tokens": steps * prof.batch_size * prof.seq_len,
                "final_loss": losses[-1],
            }
            info["parameters"] = sum(p.numel() for p in model.parameters())
            cache.mark_built(self.paths["base"], self.keys["base"], info)
            self.log(
                f"  base: {info['parameters']:,} parameters, {info['tokens']:,} tokens, loss {losses[-1]:.3f}"
            )

    def instruct(self) -> None:
        prof, tok, seed = self.prof, self.data.tok, self.seed
        settings = _settings(prof, "sft_epochs", "sft_lr", "sft_batch", "sft_freeze", "sft_replay")
        with self.clock.stage("instruction tuning (SFT)"):
            if not self._stage("instruct", "instruct", settings, self.keys["base"]):
                return
            model = training.load_model(self.paths["base"])
            for name, param in model.named_parameters():
                if any(part in name for part in prof.sft_freeze):
                    param.requires_grad_(False)
            examples = [
                training.chat_example(tok, it.messages(), it.response()) for it in self.data.world.sft
            ]
            batches = training.chat_batches(examples, prof.sft_batch, prof.sft_epochs, seed)
            if prof.sft_replay:
                batches = training.with_replay(batches, self.data.rows_a, prof.sft_replay, seed + 3)
            schedule = training.Schedule(prof.sft_lr, max(1, len(batches) // 20))
            losses = training.train(model, batches, schedule)
            training.save_model(model, tok, self.paths["instruct"], chat=True)
            info = {"steps": len(batches), "examples": len(examples), "final_loss": losses[-1]}
            cache.mark_built(self.paths["instruct"], self.keys["instruct"], info)
            self.log(f"  instruct: {len(examples)} chats x {prof.sft_epochs} epochs, loss {losses[-1]:.3f}")

    def continual_pretraining(self) -> None:
        prof = self.prof
        cpt_settings = _settings(
            prof, "cpt_docs", "cpt_lr", "cpt_warmup", "cpt_decay", "cpt_replay", "seq_len", "cpt_batch"
        )
        with self.clock.stage("continual pre-training (CPT)"):
            for start in ("base", "instruct"):
                todo = []
                for label, tokens in zip(prof.labels, prof.cpt_tokens, strict=True):
                    name = f"cpt-{start}-{label}"
                    settings = {**cpt_settings, "tokens": tokens}
                    if prof.cpt_decay != "constant":
                        settings["run_tokens"] = tokens
                    if self._stage(name, "cpt", settings, self.keys[start], self.data.key):
                        todo.append((name, tokens))
                self._cpt_runs(start, todo)

    def _cpt_runs(self, start: str, todo: list[tuple[str, int]]) -> None:
        """CPT from ``start`` for each (name, tokens) in ``todo``: one run with snapshots, or a run per size."""
        prof, tok, paths = self.prof, self.data.tok, self.paths
        runs = [todo] if prof.cpt_decay == "constant" else [[item] for item in todo]
        for run in runs if todo else []:
            steps = _cpt_steps(prof, max(tokens for _, tokens in run))
            snapshots = {_cpt_steps(prof, tokens): name for name, tokens in run}
            model = training.load_model(paths[start])
            batches = _cpt_batches(self.data.rows_b, self.data.rows_a, prof, steps, self.seed + 7)
            schedule = training.Schedule(prof.cpt_lr, min(prof.cpt_warmup, steps), prof.cpt_decay)

            def snapshot(step: int, model=model, snapshots=snapshots) -> None:
                if step in snapshots:
                    name = snapshots[step]
                    training.save_model(model, tok, paths[name], chat=start == "instruct")
                    model.train()
                    tokens = step * prof.cpt_batch * prof.seq_len
                    cache.mark_built(paths[name], self.keys[name], {"steps": step, "tokens": tokens})
                    self.log(f"  {name}: {tokens:,} tokens")

            training.train(model, batches, schedule, on_step=snapshot)

    def derived(self) -> None:
        """DocChat in miniature: the base fine-tuned in plain text on a skill neither base nor instruct has."""
        prof, tok = self.prof, self.data.tok
        if not prof.docchat_train:
            return
        settings = _settings(
            prof,
            "docchat_train",
            "docchat_eval",
            "docchat_epochs",
            "docchat_lr",
            "docchat_replay",
            "docchat_balanced",
            "sft_batch",
        )
        with self.clock.stage("derived model (DocChat)"):
            train, held_out = docchat.build_items(
                self.seed, self.data.world, prof.docchat_train, prof.docchat_eval
            )
            self.skill_task = docchat.write_task(self.models.parent / "docchat", held_out)
            if not self._stage("derived", "derived", settings, self.keys["base"], self.data.key):
                return
            model = training.load_model(self.paths["base"])
            batches = docchat.training_batches(tok, train, prof.sft_batch, prof.docchat_epochs, self.seed + 5)
            if prof.docchat_replay:
                batches = training.with_replay(
                    batches,
                    self.data.rows_a,
                    prof.docchat_replay,
                    self.seed + 6,
                    balanced=prof.docchat_balanced,
                )
            losses = training.train(
                model, batches, training.Schedule(prof.docchat_lr, max(1, len(batches) // 20))
            )
            training.save_model(model, tok, self.paths["derived"], chat=False)
            info = {"steps": len(batches), "examples": len(train), "final_loss": losses[-1]}
            cache.mark_built(self.paths["derived"], self.keys["derived"], info)
            self.log(
                f"  derived: {len(train)} passages x {prof.docchat_epochs} epochs, loss {losses[-1]:.3f}"
            )

    def ported(self) -> None:
        with self.clock.stage("port (hf_residual.ops.port)"):
            from hf_residual.ops.port import port

            targets = [(f"ported-{label}", f"cpt-base-{label}") for label in self.prof.labels]
            if "derived" in self.paths:
                targets.append(("derived-ported", "derived"))
            for name, cpt in targets:
                parents = (self.keys["instruct"], self.keys["base"], self.keys[cpt])
                if self._stage(name, "ported", {"alpha": self.prof.alpha}, *parents):
                    result = port(
                        self.paths["instruct"],
                        self.paths[cpt],
                        self.paths[name],
                        base=self.paths["base"],
                        alpha=self.prof.alpha,
                        overwrite=True,
                        progress=False,
                    )
                    cache.mark_built(
                        self.paths[name], self.keys[name], {"distance": result.details["distance"]}
                    )

    def tuned(self, tuner: Callable | None) -> None:
        """``tuner(instruct, base, target, output, budget)`` -> a Recipe (``hf_residual.tune`` behind it,
        given by the caller: the demo's layer does not import tune) searched at the largest CPT size, then
        ported at every size as ``tuned-<size>``."""
        prof = self.prof
        if tuner is None or not prof.tune_budget:
            return
        from hf_residual.ops.port import port

        with self.clock.stage("tune (hf_residual.tune)"):
            largest = f"cpt-base-{prof.labels[-1]}"
            paths = self.paths
            recipe = tuner(
                paths["instruct"],
                paths["base"],
                paths[largest],
                self.models.parent / "tune",
                prof.tune_budget,
            )
            settings = {"recipe": recipe.port_kwargs()}
            for label in prof.labels:
                name, cpt = f"tuned-{label}", f"cpt-base-{label}"
                parents = (self.keys["instruct"], self.keys["base"], self.keys[cpt])
                if self._stage(name, "tuned", settings, *parents):
                    kwargs = recipe.port_kwargs()
                    port(
                        paths["instruct"],
                        paths[cpt],
                        paths[name],
                        base=paths["base"],
                        overwrite=True,
                        progress=False,
                        **kwargs,
                    )
                    cache.mark_built(paths[name], self.keys[name], settings)
            self.recipe = settings["recipe"]

    def scores(self) -> dict[str, dict]:
        prof, data = self.prof, self.data
        with self.clock.stage("evaluation"):
            eval_key = cache.key("eval", _settings(prof, "max_new_tokens"), data.key, evaluate.VERSION)
            scores = evaluate.scores_by_weights(
                self.paths,
                lambda path: evaluate.model_scores(path, data.tok, data.world, prof.max_new_tokens, eval_key),
            )
        if "derived" in self.paths:
            with self.clock.stage("skill (lm-eval, as card --skill-tasks)"):
                names = ("base", "instruct", "derived", "derived-ported")
                skill = docchat.measure_skill(
                    {n: self.paths[n] for n in names}, self.skill_task, "derived-ported"
                )
                for name, value in skill.items():
                    scores[name] = {**scores[name], "skill": value}
        return scores


def _data(prof: Profile, seed: int) -> _Data:
    w = world.build_world(seed, prof.n_a, prof.n_b, prof.holdout, prof.eval_per_set)
    docs_a = world.corpus(random.Random(seed + 1), w.a_facts, prof.pretrain_docs)
    docs_b = world.corpus(random.Random(seed + 2), w.b_facts, prof.cpt_docs)
    chat_text = [f"{it.messages()[0]['content']} {it.response()}" for it in w.sft]
    tok = build_tokenizer(docs_a + chat_text, prof.vocab_size)
    rows_a = training.packed_rows(training.encode_documents(tok, docs_a), prof.seq_len)
    rows_b = training.packed_rows(training.encode_documents(tok, docs_b), prof.seq_len)
    key = cache.key(
        "world", _settings(prof, "n_a", "n_b", "holdout", "eval_per_set", "vocab_size"), str(seed)
    )
    return _Data(w, tok, rows_a, rows_b, key)


def run_demo(
    output: str | Path = "hf-residual-demo",
    *,
    profile: str | Profile = "quick",
    seed: int = 0,
    rebuild: bool = False,
    threads: int = 1,
    log: Callable[[str], None] = print,
    tuner: Callable | None = None,
) -> DemoResult:
    """Build (or reuse) the demo family under ``output``, evaluate every model and write the report.

    ``tuner``: adds the tuned rows (``_Build.tuned``); ``hf_residual.commands.demo.demo_tuner`` is the one
    ``hf-residual demo`` passes."""
    import torch

    started = time.perf_counter()
    prof = get_profile(profile) if isinstance(profile, str) else profile
    output = Path(output)
    clock = _Clock(log)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bars = _quiet_progress_bars()
    try:
        with clock.stage("data"):
            data = _data(prof, seed)
        build = _Build(prof, data, output / "models", seed, rebuild, log, clock)
        build.base()
        build.instruct()
        build.derived()
        build.continual_pretraining()
        build.ported()
        build.tuned(tuner)
        scores = build.scores()
        with clock.stage("report"):
            rows = report.table_rows(scores, prof)
            checks = report.pattern_checks(rows, prof)
            passed = all(c["passed"] for c in checks)
            env = report.environment(threads)
            files = report.write(output, rows, checks, prof, seed, env)
    finally:
        torch.set_num_threads(previous_threads)
        if bars:
            from transformers.utils import logging as transformers_logging

            transformers_logging.enable_progress_bar()
    total = time.perf_counter() - started
    timings = {k: round(v, 1) for k, v in clock.timings.items()}
    result = DemoResult(
        output, prof.name, seed, rows, checks, passed, timings, round(total, 1), files, env, clock.reused
    )
    report.write_timings(output, result.timings, result.total_seconds)
    return result


def _quiet_progress_bars() -> bool:
    """Hide transformers' per-load progress bars (dozens of loads would bury the stage log); True if shown."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    return shown
