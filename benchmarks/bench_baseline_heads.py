"""The baseline KD losses' student head, forward + backward: fused (gradient in the forward) vs recomputed.

``vanilla_kd``, ``uld`` and ``mined`` run their student head through ``chunked.trainable_head_loss``. The loop
hands them a ``TrainableHead`` and the expected term weights, so each chunk's head, teacher logits and loss
maths (ULD's two vocabulary sorts included) run once, in the forward. The baseline is the same loss with a
plain head callable (what a ZeRO-3 module call gets, and what these losses ran before): every chunk is run
again in the backward. Both variants are checked to give the same loss and gradients.

Sizes are those of ``bench_quality.py``'s cross-tokenizer runs: a SmolLM2-135M-sized student head (hidden 576,
GPT-2's 50257 rows) and teacher head (49152 rows), 1024 rows (one micro-batch of 8 x 128 response tokens),
chunks of 1024 rows, fp32, one thread. Time is process CPU time, the best of ``--repeats`` passes.

Usage: ``python benchmarks/bench_baseline_heads.py [--quick]``; the last line is
``SUMMARY uld_speedup=<x> mined_speedup=<y> vanilla_kd_speedup=<z>`` (recomputed / fused CPU time).
"""

from __future__ import annotations

import argparse
import time

import torch

from dskd_scale.losses import TrainableHead
from dskd_scale.losses.baselines import mined_kd_loss, uld_loss, vanilla_kd_loss
from dskd_scale.losses.divergences import DivergenceParams

HIDDEN = 576
STUDENT_VOCAB, TEACHER_VOCAB = 50_257, 49_152
ROWS, CHUNK = 1024, 1024
WEIGHT = 0.37  # d(total)/d(kd sum), as reduce.term_weights gives it; the same for both variants


def make_inputs(rows: int, student_vocab: int, teacher_vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "student_weight": torch.randn(student_vocab, HIDDEN, generator=gen) * 0.05,
        "teacher_weight": torch.randn(teacher_vocab, HIDDEN, generator=gen) * 0.05,
        "student_hidden": torch.randn(rows, HIDDEN, generator=gen),
        "teacher_hidden": torch.randn(rows, HIDDEN, generator=gen),
        "labels": torch.randint(0, student_vocab, (rows,), generator=gen),
        "aligned": torch.rand(rows, generator=gen) < 0.9,
        # a partial student -> teacher id map, as a MinED map is (-1 where no teacher token maps)
        "student_to_teacher": torch.where(torch.rand(student_vocab, generator=gen) < 0.8,
                                          torch.randint(0, teacher_vocab, (student_vocab,), generator=gen), -1),
    }


def loss(criterion: str, inputs: dict, student_head, hidden: torch.Tensor, grad_weight: float) -> torch.Tensor:
    teacher_weight = inputs["teacher_weight"]

    def teacher_head(h):
        return torch.nn.functional.linear(h, teacher_weight)

    common = dict(student_head=student_head, teacher_head=teacher_head, chunk_size=CHUNK, grad_weight=grad_weight)
    teacher_hidden = inputs["teacher_hidden"]
    if criterion == "uld":
        terms = uld_loss(hidden, teacher_hidden, student_vocab_size=inputs["student_weight"].shape[0],
                         teacher_vocab_size=teacher_weight.shape[0], **common)
    elif criterion == "mined":
        terms = mined_kd_loss(hidden, teacher_hidden, inputs["labels"], inputs["aligned"],
                              student_to_teacher_ids=inputs["student_to_teacher"],
                              params=DivergenceParams(temperature=2.0), **common)
    else:  # vanilla_kd needs one vocabulary: the teacher head takes the student's row count
        terms = vanilla_kd_loss(hidden, teacher_hidden, vocab_size=min(inputs["student_weight"].shape[0],
                                                                       teacher_weight.shape[0]),
                                params=DivergenceParams(temperature=2.0), **common)
    return terms["kd"][0]


def one_pass(criterion: str, inputs: dict, fused: bool) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CPU seconds, loss, hidden gradient, head weight gradient) of one forward + backward."""
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    if fused:
        head = TrainableHead(inputs["student_weight"])
    else:
        leaf = inputs["student_weight"].clone().requires_grad_(True)

        def head(h):
            return torch.nn.functional.linear(h, leaf)

    start = time.process_time()
    value = loss(criterion, inputs, head, hidden, WEIGHT if fused else 0.0)
    (WEIGHT * value).backward()
    seconds = time.process_time() - start
    weight_grad = head.take_gradient() if fused else leaf.grad
    return seconds, value.detach(), hidden.grad, weight_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small heads and 256 rows: checks the script in seconds")
    parser.add_argument("--repeats", type=int, default=2, help="passes per variant; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (256, 4_000, 3_500) if args.quick else (ROWS, STUDENT_VOCAB, TEACHER_VOCAB)
    inputs = make_inputs(*sizes)
    print(f"rows {sizes[0]}, student head {sizes[1]} x {HIDDEN}, teacher head {sizes[2]} x {HIDDEN}, chunks of "
          f"{CHUNK}, fp32, 1 thread; CPU seconds of one forward + backward, best of {args.repeats}")
    print(f"{'criterion':<12}{'recomputed s':>14}{'fused s':>10}{'speedup':>9}")
    summary = {}
    for criterion in ("uld", "mined", "vanilla_kd"):
        best = {}
        results = {}
        for fused in (False, True):
            for _ in range(args.repeats):
                seconds, *results[fused] = one_pass(criterion, inputs, fused)
                best[fused] = min(best.get(fused, float("inf")), seconds)
        for name, plain, fast in zip(("loss", "hidden gradient", "head gradient"), results[False], results[True],
                                     strict=True):
            # fp32 sums over up to 1024 rows x 50k vocabulary entries, accumulated in different orders
            if not torch.allclose(plain, fast, rtol=1e-4, atol=1e-6 * float(plain.abs().max())):
                raise SystemExit(f"{criterion}: the two variants disagree on the {name}")
        speedup = best[False] / best[True]
        summary[f"{criterion}_speedup"] = f"{speedup:.2f}"
        print(f"{criterion:<12}{best[False]:>14.2f}{best[True]:>10.2f}{speedup:>9.2f}", flush=True)
    print("SUMMARY " + " ".join(f"{key}={value}" for key, value in summary.items()))


if __name__ == "__main__":
    main()
