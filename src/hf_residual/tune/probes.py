"""The two probes ``tune`` scores every candidate on: instruction following and knowledge, both local and small.

Instruction following: chat prompts with verifiable instructions (``{"prompt": ..., "instructions":
[{"id": "uppercase"}, ...]}``, the offline-if format), answered greedily with the model's chat template and
judged by ``hf_residual.evaluation.verifiers`` (IFEval strict: the reply must also end its turn).
Knowledge: prompt/answer pairs completed exactly (every answer token the model's top choice, teacher-forced,
as the demo scores facts), or held-out text scored by mean log-likelihood per token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_residual.errors import ConfigError, InputNotFoundError


@dataclass(frozen=True)
class IFPrompt:
    """A user prompt and the verifiable instructions its reply must follow (verifiers' instruction dicts)."""

    prompt: str
    instructions: tuple[dict, ...]

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class QAPair:
    """A knowledge probe: ``prompt`` must be continued by exactly ``answer`` (leading space included)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Probes:
    """What every candidate is scored on. ``knowledge`` is ``qa`` (exact completion) or ``text`` (mean
    log-likelihood per token of ``texts``); ``key()`` enters the cache key, so other probes re-evaluate."""

    if_prompts: tuple[IFPrompt, ...]
    qa: tuple[QAPair, ...] = ()
    texts: tuple[str, ...] = ()
    max_new_tokens: int = 64
    max_text_tokens: int = 256
    name: str = "custom"
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.if_prompts:
            raise ConfigError("the instruction-following probe has no prompts: give at least one")
        if bool(self.qa) == bool(self.texts):
            raise ConfigError("give exactly one knowledge probe: prompt/answer pairs (qa) or held-out texts")

    @property
    def knowledge_kind(self) -> str:
        return "qa" if self.qa else "text"

    def key(self) -> str:
        data = asdict(self)
        data.pop("notes")
        data.pop("name")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        know = f"{len(self.qa)} prompt/answer pairs" if self.qa else f"{len(self.texts)} held-out texts"
        return f"{self.name}: {len(self.if_prompts)} instruction prompts, {know}"


def _jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} file {path} does not exist: give a JSONL file, one object a line")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ConfigError(
                f"{path}:{number}: not valid JSON ({error}); each line is one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{what} file {path} is empty: give at least one JSON object")
    return rows


def _check_instruction(where: str, instruction: object) -> dict:
    from hf_residual.evaluation import verifiers

    if not isinstance(instruction, dict) or instruction.get("id") not in verifiers.CHECKS:
        known = ", ".join(sorted(verifiers.CHECKS))
        raise ConfigError(
            f"{where}: unknown instruction {instruction!r}; each is {{'id': ...}} with id one of {known}"
        )
    try:
        verifiers.follows(instruction, "probe")
    except TypeError as error:
        raise ConfigError(f"{where}: instruction {instruction} has wrong arguments ({error})") from None
    return instruction


def load_if_prompts(path: str | Path) -> tuple[IFPrompt, ...]:
    """Read ``{"prompt": str, "instructions": [{"id": ..., ...}]}`` lines (the offline-if format)."""
    prompts = []
    for number, row in _jsonl(path, "instruction prompts"):
        where = f"{path}:{number}"
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("instructions"), list | str):
            raise ConfigError(
                f"{where}: each line needs 'prompt' (text) and 'instructions' (a list of objects)"
            )
        rules = row["instructions"]
        rules = json.loads(rules) if isinstance(rules, str) else rules
        if not rules:
            raise ConfigError(f"{where}: 'instructions' is empty; give at least one verifiable instruction")
        prompts.append(IFPrompt(row["prompt"], tuple(_check_instruction(where, r) for r in rules)))
    return tuple(prompts)


def load_qa(path: str | Path) -> tuple[QAPair, ...]:
    """Read ``{"prompt": str, "answer": str}`` lines; the answer is the exact continuation of the prompt."""
    pairs = []
    for number, row in _jsonl(path, "knowledge prompt/answer"):
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
            raise ConfigError(f"{path}:{number}: each line needs 'prompt' and a non-empty 'answer' (text)")
        pairs.append(QAPair(prompt, answer))
    return tuple(pairs)


def load_texts(path: str | Path) -> tuple[str, ...]:
    """Held-out texts: a ``.jsonl`` of ``{"text": ...}``, or plain text with documents split by blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, row in _jsonl(path, "knowledge text"):
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ConfigError(f"{path}:{number}: each line needs a non-empty 'text'")
            texts.append(row["text"])
        return tuple(texts)
    if not path.is_file():
        raise InputNotFoundError(
            f"knowledge text file {path} does not exist: give held-out text from the CPT corpus"
        )
    texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not texts:
        raise ConfigError(f"knowledge text file {path} is empty: give held-out text from the CPT corpus")
    return tuple(texts)


def offline_if_prompts() -> tuple[IFPrompt, ...]:
    """The offline-if suite's prompts (``evaluation/tasks/if_prompts.jsonl``): the default IF probe."""
    from hf_residual.evaluation.tasks import hooks

    return load_if_prompts(hooks.HERE / "if_prompts.jsonl")


def demo_probes(profile: str = "quick", seed: int = 0) -> Probes:
    """The demo's own probes for its family: held-out A and B format prompts, and B's facts completed
    after the demo's probe context (the same prompts, verifier and knowledge items as ``hf-residual demo``)."""
    from hf_residual.demo import evaluate, get_profile, instructions, world

    prof = get_profile(profile)
    w = world.build_world(seed, prof.n_a, prof.n_b, prof.holdout, prof.eval_per_set)
    prompts = tuple(
        IFPrompt(item.messages()[0]["content"], instructions.RULES[item.fmt]) for item in w.eval_a + w.eval_b
    )
    qa = []
    for fact in w.b_facts:
        prefix, value = fact.probe()
        qa.append(QAPair(f"{evaluate.PROBE_CONTEXT} {prefix}", value))
    return Probes(prompts, tuple(qa), max_new_tokens=prof.max_new_tokens, name=f"demo {profile}, seed {seed}")


def from_files(
    if_prompts: str | Path | None = None,
    knowledge_text: str | Path | None = None,
    knowledge_qa: str | Path | None = None,
    max_new_tokens: int = 64,
) -> Probes:
    """The CLI's probes: ``if_prompts`` (default: the offline-if prompts) and exactly one knowledge file."""
    if (knowledge_text is None) == (knowledge_qa is None):
        raise ConfigError(
            "give one knowledge probe: --knowledge-text FILE (held-out text of the CPT corpus, scored by mean "
            "log-likelihood) or --knowledge-qa FILE (JSONL of prompt/answer pairs, scored by exact completion)"
        )
    prompts = load_if_prompts(if_prompts) if if_prompts is not None else offline_if_prompts()
    name = f"{Path(if_prompts).name if if_prompts else 'offline-if'} + {Path(knowledge_text or knowledge_qa).name}"
    if knowledge_qa is not None:
        return Probes(prompts, qa=load_qa(knowledge_qa), max_new_tokens=max_new_tokens, name=name)
    return Probes(prompts, texts=load_texts(knowledge_text), max_new_tokens=max_new_tokens, name=name)
