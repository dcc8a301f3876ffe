"""DocChat in miniature (the paper's Table 4): a model derived from the base by fine-tuning a new skill, then
given the instruct residual.

The skill is answering a question from a passage given in the prompt, in plain text (no chat format):
``Passage: Kelmor lives in Borda. ... Question: Where does Kelmor live? Answer:`` -> `` Borda``. Passages are
about entities of neither world, with values drawn afresh for every example, so the answer can only be read
from the passage: neither the base nor the instruct model was trained to do it.

The skill is measured the way ``hf-residual card --skill-tasks`` expects a user to measure a derived model's
own skill: as an lm-eval task (written beside the models, with its data) run by ``hf-residual eval``'s runner
(``hf_residual.evaluation.runner.evaluate``), then recorded in the derived + residual model's card by
``hf_residual.evaluation.card.write_card`` with ``skill_tasks``, so that the card says the skill was measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from hf_residual.demo import world

TASK = "demo_docqa"
METRIC = "acc,none"  # lm-eval's loglikelihood accuracy: every answer token the model's greedy choice
VERSION = "1"  # part of the cached skill scores' key: bump when the task or its data change

TASK_YAML = """\
# hf-residual demo: the derived model's own skill (DocChat in miniature), written by hf_residual.demo.docchat.
# Answer a question from the passage in the prompt; right when every answer token is the greedy choice.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


@dataclass(frozen=True)
class DocItem:
    """One passage, a question about one of its facts, and the answer (a value stated in the passage)."""

    passage: str
    question: str
    answer: str

    def prompt(self) -> str:
        return f"Passage: {self.passage}\nQuestion: {self.question}\nAnswer:"


def _item(rng: random.Random, names: list[str], statements: int = 2) -> DocItem:
    """Statements about two entities (values drawn afresh), and a question about one of them.

    Two statements: on the quick family, 1,200 passages x 3 epochs taught 0.65 held-out accuracy with two
    and 0.41 with three (one entity stated twice), and the demo must stay quick."""
    people = rng.sample(names, 2)
    pairs = rng.sample([(e, a) for e in people for a in world.ATTRIBUTES], statements)
    facts = [world.Fact(e, a, rng.choice(world.ATTRIBUTES[a])) for e, a in pairs]
    asked = rng.choice(facts)
    passage = " ".join(f.statement(rng.randrange(3)) for f in facts)
    question = world.QUESTIONS[asked.attribute][rng.randrange(2)].format(e=asked.entity)
    return DocItem(passage, question, asked.value)


def build_items(seed: int, w: world.World, n_train: int, n_eval: int) -> tuple[list[DocItem], list[DocItem]]:
    """Training and evaluation items; their entities are new names, the evaluation's unseen in training."""
    rng = random.Random(seed + 11)
    taken = {f.entity for f in w.a_facts + w.b_facts}
    train_names = world._names(rng, 400, taken)
    eval_names = world._names(rng, 16, taken)
    return [_item(rng, train_names) for _ in range(n_train)], [_item(rng, eval_names) for _ in range(n_eval)]


def training_batches(tok, items: list[DocItem], batch_size: int, epochs: int, seed: int) -> list[dict]:
    """Plain-text fine-tuning batches: the prompt as lm-eval feeds it (no BOS, no chat template), loss on the
    answer only."""
    from hf_residual.demo import training

    end = tok.convert_tokens_to_ids("<|end_of_text|>")
    examples = []
    for it in items:
        prompt = tok(it.prompt(), add_special_tokens=False)["input_ids"]
        answer = tok(" " + it.answer, add_special_tokens=False)["input_ids"] + [end]
        examples.append((prompt + answer, [training.IGNORE] * len(prompt) + answer))
    return training.chat_batches(examples, batch_size, epochs, seed)


def write_task(folder: Path, items: list[DocItem]) -> Path:
    """The lm-eval task (YAML) and its data (JSONL) in ``folder``: what a user passes to ``hf-residual eval``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"prompt": it.prompt(), "answer": it.answer}) + "\n" for it in items))
    (folder / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=json.dumps(str(data)), version=VERSION)
    )
    return folder


def measure_skill(models: dict[str, Path], task_dir: Path, card_model: str) -> dict[str, float]:
    """The skill's accuracy per model, by ``hf-residual eval``'s runner on the task in ``task_dir``; the card of
    ``models[card_model]`` (derived + residual) then gets the results with the task as its skill task.

    Scores are cached beside each model (``demo-skill.json``, keyed by the weights' sha and the task's
    version), so a second demo run neither imports lm-eval nor runs it."""
    from hf_residual.evaluation.runner import folder_sha

    scores, todo = {}, {}
    for name, path in models.items():
        key = f"{VERSION}:{folder_sha(path)}"
        stamp = path / "demo-skill.json"
        saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
        if saved.get("key") == key:
            scores[name] = saved["skill"]
        else:
            todo[name] = (path, key)
    if todo:
        scores |= _run_lm_eval(todo, task_dir, models[card_model] if card_model in todo else None)
        for name, (path, key) in todo.items():
            (path / "demo-skill.json").write_text(json.dumps({"key": key, "skill": scores[name]}) + "\n")
    return scores


def _run_lm_eval(todo: dict[str, tuple[Path, str]], task_dir: Path, card: Path | None) -> dict[str, float]:
    from hf_residual.evaluation.card import write_card
    from hf_residual.evaluation.quiet import lm_eval_output
    from hf_residual.evaluation.runner import evaluate, task_manager
    from hf_residual.evaluation.suites import from_task_list

    # One results folder per set of weights measured: the card's table then compares these models only,
    # not earlier builds of them (the runner keeps every model it ever saw in a folder).
    weights = hashlib.sha256(" ".join(key for _, key in todo.values()).encode()).hexdigest()[:12]
    results = task_dir / "results" / weights
    # lm-eval's and datasets' progress bars (stderr) would bury the demo's stage log; errors still raise.
    with lm_eval_output(), contextlib.redirect_stderr(io.StringIO()):
        manager = task_manager([task_dir], include_defaults=False)
        run = evaluate(
            [str(p) for p, _ in todo.values()],
            from_task_list(TASK),
            results,
            batch_size=64,
            device="cpu",
            chat_template="no",  # the skill's own plain-text format, as the derived model was trained
            manager=manager,
        )
    by_path = {r.model.ref: r.results["results"][TASK][METRIC] for r in run.runs}
    if card is not None:
        write_card(str(card), [results], skill_tasks=[TASK])
    return {name: by_path[str(path)] for name, (path, _) in todo.items()}
