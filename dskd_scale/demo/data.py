"""A generated, learnable instruction dataset for the demo (no downloads).

Every example is a templated task with one correct answer, so tiny models trained for a couple of CPU
minutes can learn it and exact match / ROUGE-L separate SFT from distillation:

- ``fact``: questions about a fixed table of invented countries (capital, language, flag colour);
- ``reverse``: reverse the order of a few words;
- ``arithmetic``: small additions and subtractions;
- ``list``: turn comma-separated items (the ``input``) into a bulleted list (newlines in the answer);
- ``upper``: upper-case a short phrase (the ``input``).

Some invented names carry accents, so the data also exercises the cross-tokenizer hard cases (newlines,
non-ASCII characters). Rows follow Dolly's layout: ``instruction``, ``input``, ``prompt`` (the Alpaca-style
template Dolly uses) and ``output``. The same seed always gives the same bytes.

Splits: ``train`` (large and clean: what the teacher learns from), ``student_train`` (small, and a fraction
``label_noise`` of its answers carry a typical annotator's mistake: the situation distillation exists for, where the
teacher knows more than the student's own labels show), and clean ``valid`` (for choices) and ``test`` (only for
the final numbers). A noisy row keeps its prompt and gets a well-formed wrong answer (see ``corrupt_output``); it is
marked ``"noisy": true`` so the noise can be measured, and no training code reads that field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
TASKS = ("fact", "reverse", "arithmetic", "list", "upper")
_SYLLABLES = ("ka", "lo", "ri", "ven", "ta", "mor", "si", "dal", "ne", "bru", "zé", "fa", "quo", "lin", "ä", "por")
_LANGUAGES = ("Velish", "Tarnic", "Oskan", "Miradi", "Quelon", "Brasque")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_WORDS = ("apple", "river", "stone", "cloud", "green", "quick", "house", "light", "music", "ocean", "paper",
          "tiger", "bread", "chair", "dream", "field", "glass", "honey", "lemon", "night")
_FACT_QUESTIONS = {
    "capital": ("What is the capital of {country}?", "Name the capital city of {country}."),
    "language": ("Which language is spoken in {country}?", "What do people speak in {country}?"),
    "flag": ("What color is the flag of {country}?", "Describe the color of the flag of {country}."),
}
_FACT_ANSWERS = {
    "capital": "The capital of {country} is {capital}.",
    "language": "People in {country} speak {language}.",
    "flag": "The flag of {country} is {flag}.",
}


@dataclass(frozen=True, slots=True)
class Country:
    name: str
    capital: str
    language: str
    flag: str


def _invented_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def make_fact_table(rng: random.Random, count: int) -> list[Country]:
    """``count`` invented countries with distinct names and capitals."""
    table: list[Country] = []
    used: set[str] = set()
    while len(table) < count:
        name, capital = _invented_name(rng, 3), _invented_name(rng, 2)
        if name in used or capital in used:
            continue
        used.update((name, capital))
        table.append(Country(name, capital, rng.choice(_LANGUAGES), rng.choice(_COLOURS)))
    return table


def _example(task: str, rng: random.Random, table: list[Country]) -> tuple[str, str, str]:
    """(instruction, input, output) of one task instance."""
    if task == "fact":
        country = rng.choice(table)
        attribute = rng.choice(tuple(_FACT_QUESTIONS))
        fields = {"country": country.name, "capital": country.capital, "language": country.language,
                  "flag": country.flag}
        return rng.choice(_FACT_QUESTIONS[attribute]).format(**fields), "", _FACT_ANSWERS[attribute].format(**fields)
    if task == "reverse":
        words = rng.sample(_WORDS, rng.randint(3, 5))
        return f"Reverse the order of these words: {' '.join(words)}", "", " ".join(reversed(words))
    if task == "arithmetic":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}"
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", "", f"{a} - {b} = {a - b}"
    if task == "list":
        items = rng.sample(_WORDS, rng.randint(2, 4))
        return "Write the items of the input as a bulleted list.", ", ".join(items), "\n".join(f"- {i}" for i in items)
    if task == "upper":
        phrase = " ".join(rng.sample(_WORDS, rng.randint(2, 3)))
        return "Convert the input to upper case.", phrase, phrase.upper()
    raise ValueError(f"unknown demo task {task!r}; known: {TASKS}")


def corrupt_output(task: str, instruction: str, task_input: str, output: str, rng: random.Random,
                   table: list[Country]) -> str:
    """A well-formed but wrong answer, the kind of mistake a hurried annotator makes for this task."""
    if task == "fact":  # another country's capital, language or flag colour
        head, value = output.removesuffix(".").rsplit(" ", 1)
        field = next(f for prefix, f in (("The capital", "capital"), ("People", "language"), ("The flag", "flag"))
                     if head.startswith(prefix))
        return f"{head} {rng.choice(sorted({getattr(c, field) for c in table} - {value}))}."
    if task == "reverse":  # the words copied in their original order
        return instruction.split(": ", 1)[1]
    if task == "arithmetic":  # the result off by a little
        expression, result = output.rsplit(" = ", 1)
        return f"{expression} = {int(result) + rng.choice((-3, -2, -1, 1, 2, 3))}"
    if task == "list":  # the items left comma-separated
        return task_input
    if task == "upper":  # the phrase left in lower case
        return task_input
    raise ValueError(f"unknown demo task {task!r}; known: {TASKS}")


def make_split(rng: random.Random, table: list[Country], size: int, *, label_noise: float = 0.0
               ) -> list[dict[str, str | bool]]:
    """``size`` rows in Dolly's layout, tasks drawn uniformly; a fraction ``label_noise`` with wrong answers."""
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    rows: list[dict[str, str | bool]] = []
    for _ in range(size):
        task = rng.choice(TASKS)
        instruction, task_input, output = _example(task, rng, table)
        template = PROMPT_WITH_INPUT if task_input else PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=task_input)
        row: dict[str, str | bool] = {"task": task, "instruction": instruction, "input": task_input,
                                      "prompt": prompt, "output": output}
        if label_noise and rng.random() < label_noise:
            row.update(output=corrupt_output(task, instruction, task_input, output, rng, table), noisy=True)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str | bool]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_demo_data(out_dir: str | Path, *, seed: int = 1234, train: int = 3000, valid: int = 200, test: int = 200,
                   student_train: int = 0, label_noise: float = 0.0, countries: int = 24) -> dict[str, Path]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` under ``out_dir``; returns their paths.

    With ``student_train`` > 0 also ``student_train.jsonl``: that many fresh rows, a fraction ``label_noise`` of
    them with wrong answers. The fact table is shared by all splits (facts are learned in train, asked again in
    valid/test); the other tasks are drawn afresh per split. Deterministic for a given seed and sizes.
    """
    table = make_fact_table(random.Random(seed), countries)
    return write_splits(out_dir, seed=seed, sizes={"train": train, "valid": valid, "test": test},
                        student_train=student_train, label_noise=label_noise,
                        make_rows=lambda rng, size, noise: make_split(rng, table, size, label_noise=noise))


def write_splits(out_dir: str | Path, *, seed: int, sizes: dict[str, int], student_train: int, label_noise: float,
                 make_rows: Callable[[random.Random, int, float], list[dict[str, str | bool]]]) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for the clean ``sizes`` and, when ``student_train`` > 0, the noisy ``student_train``.

    Each split draws from its own generator, seeded by (``seed``, split name), so the clean splits do not depend on
    the student set. ``make_rows(rng, size, label_noise)`` makes one split's rows. Returns the paths keyed by split.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = [(split, size, 0.0) for split, size in sizes.items()]
    if student_train:
        splits.append(("student_train", student_train, label_noise))
    paths = {}
    for split, size, noise in splits:
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(paths[split], make_rows(random.Random(f"{seed}-{split}"), size, noise))
    return paths
