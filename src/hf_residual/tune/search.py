"""``tune``: a seeded multi-objective Optuna search over port settings, every candidate ported and scored.

Each trial's candidate is ported by the engine (``hf_residual.ops.port.port``) into ``OUTPUT/scratch``,
scored on both probes and deleted. The first trial is always alpha = 1 (task arithmetic, the paper's port).
Every score is cached (``cache.jsonl``); a run re-asks the sampler from the start and answers cached
trials from the cache, so with the same seed a re-run or a resumed run replays the same trials and only
evaluates the ones it has not seen (a larger ``budget`` continues where the last run stopped).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hf_residual.errors import ConfigError
from hf_residual.tune import report, scoring
from hf_residual.tune.cache import Cache, fingerprint, key
from hf_residual.tune.probes import Probes
from hf_residual.tune.space import DIMENSIONS, Candidate, first_params, space_for, suggest

EVAL_VERSION = "1"  # part of every cache key: bump when scoring changes
STARTUP_TRIALS = 8  # random trials before TPE models the front (fixed, so a larger budget continues a run)
# A proposal already evaluated in this run is told its scores again and does not count against the budget
# (small grids repeat: alpha alone has 21 values); after this many asks per candidate the run stops.
ASKS_PER_CANDIDATE = 4


@dataclass
class TuneResult:
    """What ``tune`` found: every candidate's scores, the Pareto front, alpha = 1 and the chosen recipe."""

    output: Path
    chosen: dict
    reference: dict
    front: list[dict]
    candidates: list[dict]
    references: dict[str, dict]
    recipe: object  # hf_residual.ops.recipe.Recipe
    evaluated: int
    reused: int
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def improved(self) -> bool:
        """Whether the chosen recipe dominates alpha = 1 (else alpha = 1 was kept)."""
        return self.chosen is not self.reference


def candidate_of(record: dict) -> Candidate:
    c = record["candidate"]
    return Candidate(c["alpha"], tuple((p, v) for p, v in c["alpha_for"]), c["method"])


def recipe_of(record: dict, reference: dict, probes: Probes, prefer: str):
    """The ``Recipe`` of a record, with its scores and alpha = 1's in ``notes``."""
    from hf_residual.ops.recipe import Recipe

    c = candidate_of(record)
    notes = {
        "tuned_by": "hf-residual tune",
        "probes": probes.describe(),
        "prefer": prefer,
        "scores": {"if_strict": record["if"], "knowledge": record["knowledge"]},
        "alpha_1_scores": {"if_strict": reference["if"], "knowledge": reference["knowledge"]},
        "knowledge_kind": probes.knowledge_kind,
    }
    return Recipe(alpha=c.alpha, alpha_for=dict(c.alpha_for), method=c.method, notes=notes)


class _Evaluator:
    """Ports a candidate into the scratch folder, scores it, deletes it; answers cached candidates."""

    def __init__(self, models: dict, probes: Probes, output: Path, device: str, log: Callable[[str], None]):
        self.models, self.probes, self.output, self.device, self.log = models, probes, output, device, log
        self.cache = Cache(output)
        self.evaluated = self.reused = 0
        ids = {role: fingerprint(m, output) for role, m in models.items()}
        evaluation = {"version": EVAL_VERSION, "probes": probes.key(), "device": device}
        self.context = json.dumps({"models": ids, "evaluation": evaluation}, sort_keys=True)

    def candidate(self, cand: Candidate, trial: int, params: dict) -> dict:
        from hf_residual.ops.port import port

        cache_key = key(cand.key_data(), self.context)
        record = self.cache.get(cache_key)
        if record is not None:
            self.reused += 1
            return record
        scratch = self.output / "scratch" / "candidate"
        started = time.perf_counter()
        try:
            port(
                self.models["instruct"].path,
                self.models["target"].path,
                scratch,
                base=self.models["base"].path,
                overwrite=True,
                progress=False,
                **cand.port_kwargs(),
            )
            scores = scoring.score(scratch, self.probes, self.device)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.evaluated += 1
        record = {
            "candidate": {
                "alpha": cand.alpha,
                "alpha_for": [list(p) for p in cand.alpha_for],
                "method": cand.method,
            },
            "trial": trial,
            "params": params,  # the sampler's values (factors), for the table
            "seconds": round(time.perf_counter() - started, 2),
            **scores,
        }
        return self.cache.put(cache_key, record)

    def model(self, role: str, tokenizer_from: Path) -> dict:
        """Scores of the instruct model or the target itself (asked with the instruct model's tokenizer)."""
        cache_key = key(json.dumps(["reference", role]), self.context)
        record = self.cache.get(cache_key)
        if record is None:
            scores = scoring.score(self.models[role].path, self.probes, self.device, tokenizer=tokenizer_from)
            record = self.cache.put(cache_key, {"reference": role, **scores})
        return record


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sampler(seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)


def run_search(evaluator: _Evaluator, space, budget: int, seed: int, progress: bool) -> list[dict]:
    """``budget`` distinct candidates from a seeded two-objective study (IF, knowledge), alpha = 1 enqueued
    first, then the plain methods and the ends of the alpha range (``space.first_params``); fewer when the
    sampler keeps proposing candidates it has seen (a space smaller than the budget)."""
    import optuna
    from tqdm.auto import tqdm

    study = optuna.create_study(directions=["maximize", "maximize"], sampler=_sampler(seed))
    for params in first_params(space):
        study.enqueue_trial(params)
    records: list[dict] = []
    seen: dict = {}  # candidate -> its record: a repeated proposal is told its scores and not counted
    with tqdm(total=budget, desc="tune", unit="candidate", disable=not progress) as bar:
        for _ in range(budget * ASKS_PER_CANDIDATE):
            if len(records) == budget:
                break
            trial = study.ask()
            candidate = suggest(trial, space)
            repeated = candidate in seen
            if not repeated:
                seen[candidate] = evaluator.candidate(candidate, trial.number, dict(trial.params))
                records.append(seen[candidate])
            study.tell(trial, [seen[candidate]["if"], seen[candidate]["knowledge"]])
            if repeated:
                continue
            best = max(records, key=lambda r: (r["if"], r["knowledge"]))
            bar.set_postfix(new=evaluator.evaluated, cached=evaluator.reused, best_if=f"{best['if']:.2f}")
            bar.update()
    return records


def tune(
    instruct: str | Path,
    base: str | Path,
    target: str | Path,
    *,
    probes: Probes,
    budget: int = 24,
    output: str | Path = "hf-residual-tune",
    space: tuple[str, ...] = DIMENSIONS,
    seed: int = 0,
    prefer: str = "balanced",
    port_to: str | Path | None = None,
    references: bool = True,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search alpha, per-group alpha and merge method for the port of ``instruct - base`` onto ``target``.

    ``probes``: what to score (``probes.demo_probes``, ``load_if_prompts`` + ``load_qa``/``load_texts``).
    ``budget``: candidates in all, alpha = 1 first; a re-run with the same ``output`` and seed reuses
    every cached candidate. ``space``: dimensions searched (``alpha``, ``groups``, ``method``).
    ``prefer``: which dominating front point to choose (``report.choose``). ``port_to``: also write the
    chosen port there, the recipe in its card. ``references``: score the instruct model and the target too.
    """
    from hf_residual.core.checkpoint import open_checkpoint
    from hf_residual.core.manifest import is_residual_folder
    from hf_residual.hub.sources import resolve

    if budget < 1:
        raise ConfigError(f"--budget must be at least 1 (alpha = 1 is the first candidate), got {budget}")
    if prefer not in report.PREFERENCES:
        raise ConfigError(f"unknown preference {prefer!r}; choose one of {', '.join(report.PREFERENCES)}")
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    models = {
        "instruct": resolve(instruct, role="source"),
        "base": resolve(base, role="base model"),
        "target": resolve(target, role="target model"),
    }
    search_space = space_for(list(open_checkpoint(models["base"].path).tensors), tuple(space))
    device = _device(device)
    evaluator = _Evaluator(models, probes, output, device, log)
    log(f"tune: {budget} candidates over {', '.join(search_space.dimensions)}; probes {probes.describe()}")
    with _quiet_loading():
        records = run_search(evaluator, search_space, budget, seed, progress)
        refs = {}
        if references and not is_residual_folder(models["instruct"].path):  # a residual has no model to score
            tokenizer_from = models["instruct"].path
            refs = {role: evaluator.model(role, tokenizer_from) for role in ("instruct", "target")}
    reference = records[0]
    chosen = report.choose(records, reference, prefer)
    recipe = recipe_of(chosen, reference, probes, prefer)
    files = report.write(output, records, reference, chosen, refs, probes.knowledge_kind)
    files["recipe"] = str(output / "recipe.yaml")
    recipe.save(files["recipe"])
    if port_to is not None:
        files["ported"] = str(_port_chosen(instruct, base, target, port_to, recipe, files["recipe"]))
    shutil.rmtree(output / "scratch", ignore_errors=True)
    return TuneResult(
        output,
        chosen,
        reference,
        report.pareto_front(records),
        records,
        refs,
        recipe,
        evaluator.evaluated,
        evaluator.reused,
        files,
        round(time.perf_counter() - started, 1),
    )


def _port_chosen(instruct, base, target, port_to, recipe, recipe_path: str) -> Path:
    """Port the chosen recipe to ``port_to`` (overwritten) and add the recipe to its card (README.md)."""
    from hf_residual.ops.port import port

    result = port(
        instruct, target, port_to, base=base, overwrite=True, progress=False, **recipe.port_kwargs()
    )
    card = result.output / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    yaml_text = Path(recipe_path).read_text(encoding="utf-8")
    card.write_text(
        text.rstrip("\n") + "\n\n## Tuned recipe\n\nChosen by `hf-residual tune`; apply it again with "
        "`hf-residual port ... --recipe recipe.yaml`:\n\n```yaml\n" + yaml_text + "```\n",
        encoding="utf-8",
    )
    return result.output


class _quiet_loading:
    """transformers' per-load progress bars off while candidates are loaded (they would bury tune's bar)."""

    def __enter__(self):
        from transformers.utils import logging as transformers_logging

        self.shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.shown:
            from transformers.utils import logging as transformers_logging

            transformers_logging.enable_progress_bar()
