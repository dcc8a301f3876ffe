"""A fictional world and the texts built from it: corpus A, corpus B ("new news"), chat data, eval sets.

Entities have a few attributes with values from small closed sets, so knowledge is checkable by exact
completion. A-entities appear in pre-training text and in chat; B-entities appear only in plain text
(continual pre-training), never in chat form: instruction following on B prompts has to come from
combining new knowledge with the chat skill, as in the paper.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hf_residual.demo import instructions

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "th"]

ATTRIBUTES = {
    "city": ["Amsel", "Borda", "Carvo", "Dunmere", "Elsk", "Fenhold", "Garrow", "Halvik", "Irrin", "Jostad"],
    "job": ["baker", "pilot", "farmer", "doctor", "painter", "sailor", "teacher", "miner", "singer", "judge"],
    "pet": ["cat", "dog", "horse", "parrot", "goat", "rabbit", "owl", "turtle", "fox", "lizard"],
}

# Plain-text statements of a fact; the first is also the knowledge probe ("<prefix>" -> value).
FACT_TEMPLATES = {
    "city": ["{e} lives in {v}.", "The home of {e} is {v}.", "{e} has a house in {v}."],
    "job": ["{e} works as a {v}.", "By trade {e} is a {v}.", "{e} earns a living as a {v}."],
    "pet": ["{e} owns a {v}.", "The pet of {e} is a {v}.", "{e} keeps a {v} at home."],
}

QUESTIONS = {
    "city": ["Where does {e} live?", "In which town is the home of {e}?"],
    "job": ["What does {e} do for a living?", "What is the job of {e}?"],
    "pet": ["What pet does {e} have?", "Which animal does {e} keep?"],
}

_GENERIC_SUBJECTS = ["the river", "a small boat", "the old mill", "the market", "a cold wind", "the bridge"]
_GENERIC_VERBS = ["runs past", "waits near", "turns toward", "rests beside", "moves over", "stands by"]
_GENERIC_OBJECTS = [
    "the hill",
    "the harbour",
    "a green field",
    "the north road",
    "the stone wall",
    "a quiet lake",
]
_GENERIC_TAILS = ["in the morning", "after the rain", "every winter", "at dusk", "on most days", ""]


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def statement(self, template: int = 0) -> str:
        return FACT_TEMPLATES[self.attribute][template].format(e=self.entity, v=self.value)

    def probe(self) -> tuple[str, str]:
        """Prompt and expected continuation for the knowledge check (first template, value last)."""
        text = self.statement(0)
        cut = text.rindex(self.value)
        return text[:cut].rstrip(), " " + self.value


@dataclass(frozen=True)
class ChatItem:
    """One instruction prompt: a question about a fact under a verifiable format instruction."""

    fact: Fact
    question: int
    fmt: str
    variant: int

    def messages(self) -> list[dict]:
        question = QUESTIONS[self.fact.attribute][self.question].format(e=self.fact.entity)
        return [{"role": "user", "content": f"{question} {instructions.instruction(self.fmt, self.variant)}"}]

    def response(self) -> str:
        return instructions.response(self.fmt, self.variant, self.fact.statement(0), self.fact.value)


@dataclass
class World:
    a_facts: list[Fact]
    b_facts: list[Fact]
    sft: list[ChatItem]
    eval_a: list[ChatItem]
    eval_b: list[ChatItem]


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
        name = "".join(parts).capitalize()
        if name not in taken and len(name) >= 4:
            taken.add(name)
            names.append(name)
    return names


def _facts(rng: random.Random, names: list[str]) -> list[Fact]:
    return [Fact(n, attr, rng.choice(values)) for n in names for attr, values in ATTRIBUTES.items()]


def build_world(seed: int, n_a: int, n_b: int, holdout: float, eval_per_set: int) -> World:
    """Entities, facts and chat items; held-out (fact, format) combinations of A are kept for evaluation."""
    rng = random.Random(seed)
    taken: set[str] = set()
    a_facts = _facts(rng, _names(rng, n_a, taken))
    b_facts = _facts(rng, _names(rng, n_b, taken))
    combos = [(f, fmt) for f in a_facts for fmt in instructions.FORMATS]
    rng.shuffle(combos)
    n_held = int(len(combos) * holdout)
    held, train = combos[:n_held], combos[n_held:]

    def item(fact: Fact, fmt: str) -> ChatItem:
        return ChatItem(fact, rng.randrange(2), fmt, rng.randrange(instructions.variants(fmt)))

    sft = [item(f, fmt) for f, fmt in train for _ in range(2)]
    eval_a = [item(f, fmt) for f, fmt in held[:eval_per_set]]
    b_combos = [(f, fmt) for f in b_facts for fmt in instructions.FORMATS]
    rng.shuffle(b_combos)
    eval_b = [item(f, fmt) for f, fmt in b_combos[:eval_per_set]]
    return World(a_facts, b_facts, sft, eval_a, eval_b)


def generic_sentences(rng: random.Random, count: int) -> list[str]:
    """Filler text with no facts, so corpora look like more than a fact list."""
    out = []
    for _ in range(count):
        tail = rng.choice(_GENERIC_TAILS)
        words = [
            rng.choice(_GENERIC_SUBJECTS),
            rng.choice(_GENERIC_VERBS),
            rng.choice(_GENERIC_OBJECTS),
            tail,
        ]
        out.append((" ".join(w for w in words if w) + ".").capitalize())
    return out


def corpus(rng: random.Random, facts: list[Fact], documents: int, generic_share: float = 0.3) -> list[str]:
    """Plain-text documents: shuffled fact statements (every template) mixed with generic sentences."""
    docs = []
    for _ in range(documents):
        sentences = [rng.choice(facts).statement(rng.randrange(3)) for _ in range(6)]
        sentences += generic_sentences(rng, int(len(sentences) * generic_share))
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    return docs
