"""Session fixture for the teacher-cache tests: demo tokenizers, two prealigned folders with the same teacher
tokenizer and different students, and a saved random tiny Llama teacher, built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_demo(tmp_path_factory) -> dict[str, Path]:
    """``eta``: teacher BPE <-> student SentencePiece; ``self``: teacher BPE on both sides (another student
    tokenizer, same text and teacher tokens); ``teacher``/``other_teacher``: saved tiny Llama models (seeds 3, 4)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_scale.config.run import ModelConfig
    from dskd_scale.demo import build_demo_assets
    from dskd_scale.models.build import random_model_config
    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign

    root = tmp_path_factory.mktemp("teacher_cache_demo")
    paths = build_demo_assets(root / "assets", seed=7, train=24, valid=2, test=2)
    teacher_tok, student_tok = str(paths["teacher_tokenizer"]), str(paths["student_tokenizer"])
    for name, student in (("eta", student_tok), ("self", teacher_tok)):
        run_prealign(PrealignConfig(teacher_tokenizer=teacher_tok, student_tokenizer=student,
                                    data=(str(paths["train"]),), out=str(root / name), max_length=96, num_shards=2))
    spec = ModelConfig(tokenizer=teacher_tok, architecture="llama", hidden_size=48, num_layers=2, num_heads=4,
                       max_position_embeddings=256)
    for name, seed in (("teacher", 3), ("other_teacher", 4)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(random_model_config(spec, AutoTokenizer.from_pretrained(teacher_tok)))
        model.save_pretrained(root / name)
    return {"root": root, "teacher_tokenizer": Path(teacher_tok), "student_tokenizer": Path(student_tok),
            "eta": root / "eta", "self": root / "self", "teacher": root / "teacher",
            "other_teacher": root / "other_teacher"}
