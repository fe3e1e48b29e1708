"""Run by test_zero3_head.py in its own process: dskd_loss + student_ce with a ZeRO-3 partitioned student
head called as a module (single rank, CPU, gloo). Prints one line
``MAXDIFF <float> GRADSCALE <float> LOSSDIFF <float> LOSS <float>`` (differences and magnitudes)."""

from __future__ import annotations

import copy
import os
import sys

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from torch import nn

from dskd_scale.losses import LOSS_TERMS, DSKDOptions, dskd_loss, student_ce
from dskd_scale.projectors import PinvS2TMap, T2SProjector

D, E, V, A = 16, 24, 50, 37


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, D)
        self.head = nn.Linear(D, V, bias=False)
        self.t2s = T2SProjector(E, D)


def total_loss(model, frozen_head_weight, teacher_weight, s2t, x, teacher_hidden, labels):
    hidden = model.body(x)
    terms = dskd_loss(
        hidden,
        teacher_hidden,
        student_head=model.head,
        student_head_frozen=lambda h: F.linear(h, frozen_head_weight),
        teacher_head=lambda h: F.linear(h, teacher_weight),
        t2s_projector=model.t2s,
        s2t_map=s2t,
        teacher_to_student_ids=torch.arange(V),
        options=DSKDOptions(chunk_size=8),
        student_labels_A=labels,
    )
    ce_sum, _ = student_ce(hidden, labels, model.head, chunk_size=5)  # a second chunked use of the head
    return sum(terms[name][0] for name in LOSS_TERMS) + ce_sum


def main() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    torch.manual_seed(0)
    model = Student()
    reference = copy.deepcopy(model)
    teacher_weight, x = torch.randn(V, E), torch.randn(A, 8)
    teacher_hidden, labels = torch.randn(A, E), torch.randint(0, V, (A,))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert engine.module.head.weight.numel() == 0, "the head must be partitioned outside a gather"
    s2t = PinvS2TMap(teacher_weight, torch.arange(V))
    with deepspeed.zero.GatheredParameters([engine.module.head.weight]):
        frozen = engine.module.head.weight.detach().clone()
    s2t.rebuild(frozen)
    loss = total_loss(engine.module, frozen, teacher_weight, s2t, x, teacher_hidden, labels)
    engine.backward(loss)
    expected = total_loss(reference, reference.head.weight.detach(), teacher_weight, s2t, x, teacher_hidden, labels)
    expected.backward()
    reference_grads = dict(reference.named_parameters())
    diff = max(
        float((safe_get_full_grad(p) - reference_grads[name].grad).abs().max())
        for name, p in engine.module.named_parameters()
    )
    scale = max(float(p.grad.abs().max()) for p in reference_grads.values() if p.grad is not None)
    print(f"MAXDIFF {diff} GRADSCALE {scale} LOSSDIFF {abs(float(loss) - float(expected))} LOSS {float(expected)}",
          flush=True)


if __name__ == "__main__":
    main()
    from dskd_scale.engine.distributed import barrier, shutdown

    # Leave the process group together: exiting with gloo's threads alive can abort a rank at teardown
    # ("terminate called without an active exception").
    barrier()
    shutdown()
