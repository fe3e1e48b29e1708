"""Demo assets generated on the spot: an instruction dataset and two different tokenizers.

``build_demo_assets(out_dir)`` writes ``train/valid/test.jsonl`` (and, when asked, the small noisy
``student_train.jsonl``) plus ``teacher_tokenizer/`` (byte-level BPE) and ``student_tokenizer/`` (Llama-style BPE
with byte fallback), so ``make demo`` runs the cross-tokenizer path with no downloads. Two datasets:
``knowledge`` (``knowledge.py``: facts to memorise; what ``make demo`` distils) and ``tasks`` (``data.py``: templated
copying, arithmetic and list tasks with newlines in answers; the hard alignment cases the test fixtures use).
"""

from __future__ import annotations

import json
from pathlib import Path

from dskd_scale.demo.data import TASKS, make_demo_data
from dskd_scale.demo.knowledge import KNOWLEDGE_TASKS, make_knowledge_data
from dskd_scale.demo.tokenizers import train_student_tokenizer, train_teacher_tokenizer

__all__ = ["DATASETS", "KNOWLEDGE_TASKS", "TASKS", "build_demo_assets", "make_demo_data", "make_knowledge_data",
           "train_student_tokenizer", "train_teacher_tokenizer"]
DATASETS = ("tasks", "knowledge")


def build_demo_assets(out_dir: str | Path, *, seed: int = 1234, train: int = 3000, valid: int = 200,
                      test: int = 200, student_train: int = 0, label_noise: float = 0.0,
                      split_student_punctuation: bool = False, dataset: str = "tasks") -> dict[str, Path]:
    """Write the demo data and both tokenizers under ``out_dir``.

    ``split_student_punctuation`` is passed to ``train_student_tokenizer`` as ``split_punctuation``: False keeps
    the hard case the test fixtures use (the first word of every response and every word before a full stop have
    no exact counterpart in the teacher's tokens); ``make demo`` uses True (Llama-like splits). ``dataset`` is one
    of ``DATASETS``.

    Returns:
        Paths keyed ``train``, ``valid``, ``test`` (and ``student_train`` when ``student_train`` > 0; jsonl files),
        ``teacher_tokenizer`` and ``student_tokenizer`` (folders). Tokenizers are trained on the prompts and outputs
        of the (clean) train split.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    out_dir = Path(out_dir)
    make_data = make_knowledge_data if dataset == "knowledge" else make_demo_data
    paths = make_data(out_dir, seed=seed, train=train, valid=valid, test=test, student_train=student_train,
                      label_noise=label_noise)
    with open(paths["train"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    corpus = [row["prompt"] + row["output"] for row in rows]
    paths["teacher_tokenizer"] = train_teacher_tokenizer(corpus, out_dir / "teacher_tokenizer")
    paths["student_tokenizer"] = train_student_tokenizer(corpus, out_dir / "student_tokenizer",
                                                         split_punctuation=split_student_punctuation)
    return paths
