"""Which optimizer steps are on-policy, and the seed of each step's rollout sampling: pure functions of
``(seed, step)`` and ``(seed, rank, step)``.

The coin of step ``k`` (0-based: the step about to run when ``LoopState.step == k``) is
``uniform(SeedSequence([seed, k, COIN])) < ratio``. Every rank computes it from the run config's ``seed`` and the
loop's step counter, both identical on every rank (one config; a resume loads the one checkpointed step), so the
ranks never disagree and no broadcast is needed; this matters because generation runs collectives (the ZeRO-3
gather) that a rank taking the other branch would never join. The same holds after a resume: nothing but the
step counter is state, and it is in the checkpoint.

The rollout sampling of step ``k`` on rank ``r`` draws from a ``torch.Generator`` seeded with
``SeedSequence([seed, r, k, ROLLOUT])``: each rank samples its own prompts with its own stream, and a resumed run
samples exactly what the uninterrupted run sampled at that step (same weights, same prompts, same generator),
without saving generator states.
"""

from __future__ import annotations

import numpy as np

# Stream tags, so the coin and the rollout sampling never share a random stream with each other or with the
# sampler (``data.seed``) whatever the seeds.
_COIN = 0x6F6E636F
_ROLLOUT = 0x726F6C6C


def is_on_policy_step(seed: int, step: int, ratio: float) -> bool:
    """Whether optimizer step ``step`` (0-based) learns from student rollouts; ``ratio`` 0 never, 1 always."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    return bool(np.random.default_rng(np.random.SeedSequence([seed, step, _COIN])).random() < ratio)


def rollout_generator_seed(seed: int, rank: int, step: int) -> int:
    """The ``torch.Generator`` seed (63 bits) of rank ``rank``'s rollout sampling at step ``step``."""
    words = np.random.SeedSequence([seed, rank, step, _ROLLOUT]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
