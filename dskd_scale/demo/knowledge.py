"""The demo's dataset: questions whose answers are facts to be learned, not worked out from the prompt.

``make demo`` asks whether distillation passes on what a teacher knows. So every answer here is a fact the model
must have memorised: the capital, language and flag colour of invented countries, and the opposite of a word. A
tiny model can learn such a fact from examples, but nothing in the prompt gives it away (the old copying and
arithmetic tasks, which ``data.py`` still generates for the test fixtures, were beyond the demo's tiny models, so
both students stayed near zero and the comparison measured nothing).

The setting is the one distillation exists for. The teacher learns every fact from a large clean set. The student
gets a small set of its own in which a fraction ``label_noise`` of the answers carry a wrong fact (another
country's capital, another colour, another word's opposite), the way a hurried annotator gets facts wrong, and in
which each fact appears only a few times. SFT can only follow those labels; a distilled student also sees the
teacher's distribution at every answer token. Validation and test ask the same facts again, clean, with the same
question phrasings.

Prompts use a short instruction template (``### Instruction:`` / ``### Response:``): the long Alpaca preamble
would triple every sequence and with it the demo's CPU time, and carries nothing a fact question needs. Invented
names carry accents (``ä``, ``é``), so the cross-tokenizer path still meets byte fallback and non-ASCII text.
Rows follow Dolly's layout (``instruction``, ``input``, ``prompt``, ``output``) plus ``task`` and, on corrupted rows,
``"noisy": true`` (no training code reads it). The same seed always gives the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from dskd_scale.demo.data import Country, make_fact_table, write_splits

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
COUNTRY_FIELDS = ("capital", "language", "flag")
KNOWLEDGE_TASKS = (*COUNTRY_FIELDS, "opposite")
_QUESTIONS = {
    "capital": ("What is the capital of {key}?", "Name the capital city of {key}."),
    "language": ("Which language is spoken in {key}?", "What do people speak in {key}?"),
    "flag": ("What color is the flag of {key}?", "Describe the color of the flag of {key}."),
    "opposite": ("What is the opposite of {key}?", "Give the opposite of the word {key}."),
}
# The answer never repeats the key: copying a name out of the prompt is a skill of its own, which the demo's
# students do not have the steps to learn, and it would blur what is measured (whether the fact is known).
_ANSWERS = {"capital": "Its capital is {value}.", "language": "They speak {value}.", "flag": "The flag is {value}.",
            "opposite": "The opposite is {value}."}
OPPOSITE_PAIRS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("old", "young"), ("tall", "short"),
                  ("happy", "sad"), ("early", "late"), ("light", "dark"), ("strong", "weak"), ("rich", "poor"),
                  ("hard", "soft"), ("full", "empty"), ("wet", "dry"), ("loud", "quiet"), ("open", "closed"),
                  ("clean", "dirty"), ("high", "low"), ("near", "far"), ("thick", "thin"), ("wide", "narrow"))
OPPOSITE_SHARE = 0.25  # of the rows; the rest ask about countries, the three fields equally often


@dataclass(frozen=True, slots=True)
class World:
    """The facts every split asks about."""

    countries: tuple[Country, ...]
    opposites: tuple[tuple[str, str], ...]  # (word, its opposite), both directions

    def facts(self, task: str) -> dict[str, str]:
        """``{key: answer value}`` of one task: country name -> field value, or word -> opposite."""
        if task == "opposite":
            return dict(self.opposites)
        if task not in COUNTRY_FIELDS:
            raise ValueError(f"unknown demo task {task!r}; known: {KNOWLEDGE_TASKS}")
        return {country.name: getattr(country, task) for country in self.countries}


def make_world(rng: random.Random, *, countries: int, opposite_pairs: int) -> World:
    if not 1 <= opposite_pairs <= len(OPPOSITE_PAIRS):
        raise ValueError(f"opposite_pairs must be in [1, {len(OPPOSITE_PAIRS)}], got {opposite_pairs}")
    pairs = OPPOSITE_PAIRS[:opposite_pairs]
    return World(tuple(make_fact_table(rng, countries)), pairs + tuple((b, a) for a, b in pairs))


def knowledge_row(task: str, key: str, value: str, phrasing: int) -> dict[str, str | bool]:
    instruction = _QUESTIONS[task][phrasing].format(key=key)
    return {"task": task, "instruction": instruction, "input": "", "prompt": PROMPT.format(instruction=instruction),
            "output": _ANSWERS[task].format(value=value)}


def make_knowledge_split(rng: random.Random, world: World, size: int, *, label_noise: float = 0.0
                         ) -> list[dict[str, str | bool]]:
    """``size`` questions with uniformly drawn keys; a fraction ``label_noise`` answered with another valid value."""
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    rows = []
    for _ in range(size):
        task = "opposite" if rng.random() < OPPOSITE_SHARE else rng.choice(COUNTRY_FIELDS)
        facts = world.facts(task)
        key = rng.choice(sorted(facts))
        row = knowledge_row(task, key, facts[key], rng.randrange(len(_QUESTIONS[task])))
        if label_noise and rng.random() < label_noise:
            wrong = rng.choice(sorted(set(facts.values()) - {facts[key]}))
            row.update(output=_ANSWERS[task].format(value=wrong), noisy=True)
        rows.append(row)
    return rows


def make_knowledge_data(out_dir: str | Path, *, seed: int = 1234, train: int = 3000, valid: int = 200,
                        test: int = 200, student_train: int = 0, label_noise: float = 0.0, countries: int = 20,
                        opposite_pairs: int = 12) -> dict[str, Path]:
    """Write ``train``, ``valid``, ``test`` (and with ``student_train`` > 0 the noisy ``student_train``) ``.jsonl``.

    All splits ask about one world of facts; each draws its own rows (``data.write_splits``). Returns the paths
    keyed by split.
    """
    world = make_world(random.Random(seed), countries=countries, opposite_pairs=opposite_pairs)
    return write_splits(out_dir, seed=seed, sizes={"train": train, "valid": valid, "test": test},
                        student_train=student_train, label_noise=label_noise,
                        make_rows=lambda rng, size, noise: make_knowledge_split(rng, world, size, label_noise=noise))
