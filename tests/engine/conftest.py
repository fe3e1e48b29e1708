"""Session fixtures for the engine tests: demo tokenizers, prealigned shards and saved tiny models, built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    """Demo tokenizers (teacher byte-level BPE, student SentencePiece), prealigned shards for the cross-vocabulary
    pair and for the student tokenizer on both sides, and saved random tiny models (Llama teacher, GPT-2 student)
    so every engine starts from identical weights whatever its ZeRO stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_scale.config.run import ModelConfig
    from dskd_scale.demo import build_demo_assets
    from dskd_scale.models.build import random_model_config
    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign

    root = tmp_path_factory.mktemp("engine_demo")
    paths = build_demo_assets(root / "assets", seed=7, train=48, valid=8, test=2)
    teacher_tok, student_tok = str(paths["teacher_tokenizer"]), str(paths["student_tokenizer"])
    for name, teacher in (("eta", teacher_tok), ("same", student_tok)):
        run_prealign(PrealignConfig(teacher_tokenizer=teacher, student_tokenizer=student_tok,
                                    data=(str(paths["train"]),), out=str(root / name), max_length=96))
    models = {}
    for role, arch, hidden, tokenizer in (("teacher", "llama", 48, teacher_tok), ("student", "gpt2", 32, student_tok),
                                          ("teacher_same", "llama", 48, student_tok)):
        import torch

        torch.manual_seed(3)
        spec = ModelConfig(tokenizer=tokenizer, architecture=arch, hidden_size=hidden, num_layers=2, num_heads=4,
                           max_position_embeddings=256)
        model = AutoModelForCausalLM.from_config(random_model_config(spec, AutoTokenizer.from_pretrained(tokenizer)))
        model.save_pretrained(root / role)
        models[role] = root / role
    return {"root": root, "teacher_tokenizer": Path(teacher_tok), "student_tokenizer": Path(student_tok),
            "eta": root / "eta", "same": root / "same", **models}
