"""Batch- and rank-invariant sampling: Gumbel-max with counter-based noise.

``torch.multinomial`` draws from one generator for the whole batch, so what example ``i`` samples depends on which
other examples share its batch, the batch size and the number of ranks. Here the noise for token ``v`` at decoding
step ``t`` of example ``k`` under seed ``s`` is a pure function ``hash(s, k, t, v)``; adding Gumbel(0, 1) noise to
the (temperature-scaled, filtered) logits and taking the argmax samples exactly from their softmax. A seed's
samples are therefore the same whatever the batch composition, batch size or world size.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32 shape) on int64 tensors holding values in [0, 2**32).

    Both multipliers are < 2**31, so every product stays below 2**63: no int64 overflow on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed: int, keys_B: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Uniform(0, 1) float64 noise ``[B, vocab_size]``, a pure function of (seed, key, step, token id)."""
    device = keys_B.device
    base = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device) ^ 0x2545F491)
    row_B1 = _mix32(_mix32(base ^ (keys_B.to(torch.int64) & _MASK32)) ^ (step & _MASK32)).unsqueeze(1)
    token_V = torch.arange(vocab_size, dtype=torch.int64, device=device)
    bits_BV = _mix32(_mix32(row_B1 ^ token_V) ^ 0x68E31DA4)
    return (bits_BV.to(torch.float64) + 0.5) / 2.0**32


class CounterGumbelNoise(LogitsProcessor):
    """Adds Gumbel noise keyed by (seed, example key, step, token) so that greedy decoding becomes sampling.

    ``keys_B`` identifies the examples of the batch (their row index in the dataset); ``prompt_length`` is the
    padded prompt width, so the step counter is the number of tokens generated so far.
    """

    def __init__(self, seed: int, keys_B: torch.Tensor, prompt_length: int):
        self.seed = seed
        self.keys_B = keys_B
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        uniform_BV = counter_uniform(self.seed, self.keys_B.to(scores.device), step, scores.shape[-1])
        gumbel_BV = -torch.log(-torch.log(uniform_BV))
        return (scores.float() + gumbel_BV.float()).to(scores.dtype)


def sampling_processors(
    *, seed: int, keys_B: torch.Tensor, prompt_length: int, temperature: float, top_k: int, top_p: float
) -> LogitsProcessorList:
    """Temperature, then top-k / top-p filtering (as HF orders them), then the keyed Gumbel noise."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(CounterGumbelNoise(seed, keys_B, prompt_length))
    return processors
