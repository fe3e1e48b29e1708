"""Two real gloo processes: all-reduced counts + DP-averaged gradients equal the single-process full batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from losses_reference import TinyDistillation
from tolerance import reduction_tolerance

from dskd_scale.losses import combine_terms

PORT = 29811
SHARDS = [[[0, 1], [2]], [[3, 4, 5], [6]]]  # rank -> micro-batches -> example ids
ALPHA = 0.4
# A gradient entry sums over the examples' rows (~40), a head softmax (V, W ~ 13) and hidden sizes (~8) in
# fp32, in an order that depends on the split: the bound follows from that chain (tolerance.py).
CHAIN = 40 + 13 + 13 + 8 + 8


def GRAD_TOLERANCE(want):  # noqa: N802 (reads as a constant at the call sites)
    return reduction_tolerance(torch.float32, CHAIN, scale=float(want.abs().max()) + 1.0)


def _worker(rank: int, world: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        setup = TinyDistillation(seed=0)
        accum = len(SHARDS[rank])
        # The engine's job, done here by hand: count the whole GA window locally, then SUM over ranks.
        local = {}
        for ids in SHARDS[rank]:
            for name, value in setup.local_counts([setup.examples[i] for i in ids]).items():
                local[name] = local.get(name, 0) + value
        names = sorted(local)
        counts = torch.tensor([float(local[n]) for n in names])
        dist.all_reduce(counts)
        global_counts = dict(zip(names, counts, strict=True))
        for ids in SHARDS[rank]:
            batch = [setup.examples[i] for i in ids]
            loss, _ = combine_terms(
                setup.terms(batch), global_counts, alpha=ALPHA, world_size=world, grad_accum_steps=accum
            )
            (loss / accum).backward()
        grads = [p.grad for p in setup.params()]
        for grad in grads:  # DeepSpeed's data-parallel gradient average
            dist.all_reduce(grad)
            grad /= world
        reference = TinyDistillation(seed=0)
        batch = reference.examples
        loss, _ = combine_terms(
            reference.terms(batch), reference.local_counts(batch), alpha=ALPHA, world_size=1, grad_accum_steps=1
        )
        loss.backward()
        for got, want in zip(grads, reference.take_grads(), strict=True):
            torch.testing.assert_close(got, want, **GRAD_TOLERANCE(want))
        open(os.path.join(result_dir, f"rank{rank}.ok"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_process_gloo_matches_single_process(tmp_path):
    warm = TinyDistillation(seed=0)  # first-call operator initialisation happens once, before the fork
    warm.terms(warm.examples)["kd_s2t"][0].backward()
    # fork: the children inherit the imported modules (CPU only, no CUDA state to corrupt), which keeps the
    # test to a few seconds on a loaded 2-core machine.
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]
