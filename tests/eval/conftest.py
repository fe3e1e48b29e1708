"""Eval test helpers: a scripted "oracle" causal LM and the tiny real model, loaded once per session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dskd_scale.utils.assets import asset_path, missing_asset_reason


class OracleModel(torch.nn.Module):
    """Completes each known prompt with a scripted text, through the ``generate`` interface of HF models.

    Prompts are recognised by their token ids, so the whole evaluation path (tokenising, left padding, batching,
    stripping EOS/padding, stop strings, scoring, records) runs for real while the completions are known.
    """

    def __init__(self, tokenizer, completions: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.completions = {tuple(tokenizer(p)["input_ids"]): c for p, c in completions.items()}
        self.config = SimpleNamespace(max_position_embeddings=8192)
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.batch_sizes: list[int] = []

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=None, stopping_criteria=None):
        self.batch_sizes.append(input_ids.shape[0])
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        new_rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(token for token, keep in zip(ids, mask, strict=True) if keep)
            completion = self.tokenizer(self.completions[prompt])["input_ids"]
            new_rows.append((completion + [eos])[: generation_config.max_new_tokens])
        width = max(len(row) for row in new_rows)
        padded = [row + [pad] * (width - len(row)) for row in new_rows]
        return torch.cat([input_ids, torch.tensor(padded, dtype=torch.long)], dim=1)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    path = asset_path("tokenizers/gpt2")
    if path is None:
        pytest.skip(missing_asset_reason("tokenizers/gpt2"))
    from transformers import AutoTokenizer

    from dskd_scale.eval.loading import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    return tokenizer


@pytest.fixture
def oracle(gpt2_tokenizer):
    return lambda completions, tokenizer=None: OracleModel(tokenizer or gpt2_tokenizer, completions)


@pytest.fixture(scope="session")
def tiny_gpt2():
    path = asset_path("models/tiny-gpt2")
    if path is None:
        pytest.skip(missing_asset_reason("models/tiny-gpt2"))
    from dskd_scale.eval.loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(path, dtype="fp32", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def load_tool():
    """Import ``tools/<name>.py`` (an entry-point script, not a package) as a module."""
    import importlib.util
    from pathlib import Path

    tools_dir = Path(__file__).resolve().parents[2] / "tools"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"dskd_tool_{name}", tools_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
