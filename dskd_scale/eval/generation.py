"""Left-padded batched generation with per-task stop strings, on any Hugging Face causal LM.

Prompts are tokenised once (for length-sorted batching), truncated from the *left* when longer than
``max_prompt_tokens`` (the end of a prompt holds the "### Response:" cue; each truncation is counted), left-padded
per batch, and decoded with HF ``generate``. Sampling uses the keyed Gumbel noise of ``sampling.py`` on top of
argmax decoding, so results do not depend on batching. A row stops at EOS or at the first stop string; the text is
cut before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from dskd_scale.eval.config import SamplingConfig
from dskd_scale.eval.distributed import DistContext, batches_for_rank, plan_batches
from dskd_scale.eval.sampling import sampling_processors
from dskd_scale.utils.logging import progress

GREEDY = SamplingConfig(greedy=True, no_repeat_ngram_size=0)


@dataclass(frozen=True, slots=True)
class Generation:
    """One completion. ``finish`` is ``eos``, ``stop`` (a stop string) or ``length`` (max_new_tokens reached)."""

    text: str
    new_tokens: int
    finish: str
    prompt_truncated: bool


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the model's generation-config EOS id(s)."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if value is None:
            continue
        ids.update(value if isinstance(value, list | tuple) else [value])
    return sorted(ids)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids per prompt (special tokens as the tokenizer adds them), left-truncated to ``max_prompt_tokens``."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    ids, truncated = [], []
    for prompt_ids in encoded:
        too_long = len(prompt_ids) > max_prompt_tokens
        if too_long:
            keep_bos = bos is not None and prompt_ids[0] == bos
            tail = prompt_ids[len(prompt_ids) - max_prompt_tokens + int(keep_bos) :]
            prompt_ids = ([bos] if keep_bos else []) + tail
        ids.append(prompt_ids)
        truncated.append(too_long)
    return ids, truncated


class _StopOnStrings(StoppingCriteria):
    """True for rows whose generated text (prompt excluded) contains a stop string; decodes only a short tail."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_length = prompt_length
        self.window = 4 + max(len(s) for s in stop_strings)  # a token is at least one character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_length :][:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hits = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


def _finish_row(tokenizer, new_ids: list[int], eos_ids: set[int], stop_strings: Sequence[str]) -> tuple[str, int, str]:
    finish = "length"
    for position, token in enumerate(new_ids):
        if token in eos_ids:
            new_ids, finish = new_ids[:position], "eos"
            break
    else:  # a row stopped by a stop string is padded to the batch's length afterwards: do not count the padding
        while new_ids and new_ids[-1] == tokenizer.pad_token_id:
            new_ids = new_ids[:-1]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [text.find(stop) for stop in stop_strings if stop in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return text, len(new_ids), finish


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    keys: Sequence[int],
    *,
    sampling: SamplingConfig,
    seed: int,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
) -> list[tuple[str, int, str]]:
    """Complete one batch of tokenised prompts; returns (text, new token count, finish reason) per row.

    ``keys`` are the examples' stable ids (dataset row numbers): with ``sampling.greedy`` false they key the noise.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    pad_id = tokenizer.pad_token_id
    input_ids_BL = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_BL = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids_BL[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_BL[row, width - len(ids) :] = 1
    eos_ids = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_ids or None, pad_token_id=pad_id,
        no_repeat_ngram_size=sampling.no_repeat_ngram_size or None,
        repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
    )  # fmt: skip
    processors = None
    if not sampling.greedy:
        keys_B = torch.tensor(list(keys), dtype=torch.long, device=device)
        processors = sampling_processors(
            seed=seed, keys_B=keys_B, prompt_length=width, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p,
        )  # fmt: skip
    stopping = StoppingCriteriaList([_StopOnStrings(tokenizer, stop_strings, width)]) if stop_strings else None
    # HF fills every field left unset here from the checkpoint's generation_config.json (repetition_penalty,
    # no_repeat_ngram_size, suppress_tokens, stop_strings, ...). The protocol must be exactly the configured one,
    # so the checkpoint's defaults are swapped out for the call.
    checkpoint_defaults = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        output_BL = model.generate(
            input_ids=input_ids_BL.to(device), attention_mask=attention_BL.to(device), generation_config=config,
            logits_processor=processors, stopping_criteria=stopping,
        )  # fmt: skip
    finally:
        model.generation_config = checkpoint_defaults
    new_rows = output_BL[:, width:].tolist()
    return [_finish_row(tokenizer, row, set(eos_ids), stop_strings) for row in new_rows]


def generate_shard(
    model,
    tokenizer,
    prompts: Sequence[str],
    keys: Sequence[int],
    *,
    sampling: SamplingConfig,
    seed: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
    context: DistContext,
    desc: str = "generate",
) -> dict[int, Generation]:
    """This rank's share of the completions of ``prompts``, keyed by position in ``prompts``."""
    prompt_ids, truncated = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    batches = batches_for_rank(plan_batches([len(ids) for ids in prompt_ids], batch_size), context)
    results: dict[int, Generation] = {}
    for batch in progress(batches, total=len(batches), desc=desc, unit="batch"):
        outputs = generate_batch(
            model, tokenizer, [prompt_ids[p] for p in batch], [keys[p] for p in batch], sampling=sampling,
            seed=seed, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
        )  # fmt: skip
        for position, (text, count, finish) in zip(batch, outputs, strict=True):
            results[position] = Generation(text, count, finish, truncated[position])
    return results
