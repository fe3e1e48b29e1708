"""Whole DSKD v2 loss, forward + backward: chunked (dskd_scale) vs naive (the anchor's full-logit way).

Each (variant, size) runs in its own child process so peak memory is measured cleanly: the child allocates
heads and hidden states, records its memory in use (the baseline), runs one warm-up pass on 8 rows, then
the measured forward+backward. The memory figure compared is the loss's working memory: peak minus
the baseline (weights and inputs are the same for both variants and excluded; the gradients the backward
creates are included; absolute peaks are printed too).

- ``--device cpu`` (default): memory is the resident set (``ru_maxrss``, baseline ``VmRSS`` read before the
  warm-up, so that memory the allocators keep from the warm-up and reuse is not hidden in it); time is the
  process CPU time (user + system) of one measured pass with one thread, because the wall time on a shared
  machine swings with other users' load between the two child runs; wall times are printed too.
- ``--device cuda``: memory is ``torch.cuda.max_memory_allocated`` (baseline ``memory_allocated``); time is
  the wall time of a pass between ``torch.cuda.synchronize()`` calls, the fastest of three passes.

Both variants compute the same four terms (student CE, KD_t2s with the agreement mask, CE_t2s, KD_s2t;
forward KL, temperature 2) with the same heads, projector and s2t matrix, and their loss values are
checked to agree. Sizes: V = 32k with 4096 tokens, V = 152k with 1024 tokens; student hidden 1024,
teacher hidden 2048; fp32 weights (the naive path needs several GB at 152k).

Usage: ``python benchmarks/bench_losses.py [--quick] [--device cuda]``; the last line is
``SUMMARY mem_ratio_152k=<x> time_ratio_152k=<y> ...`` (ratios = chunked / naive, lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STUDENT_HIDDEN, TEACHER_HIDDEN = 1024, 2048
SIZES = {"32k": (32_000, 4096), "152k": (152_064, 1024)}
QUICK_SIZES = {"32k": (4_000, 2048), "152k": (16_000, 1024)}
TEMPERATURE = 2.0


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _naive_fkl_rows(student_logits, target_logits):
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float() / TEMPERATURE, -1)
    log_p = F.log_softmax(target_logits.float() / TEMPERATURE, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def naive_loss(inputs: dict) -> dict:
    """The anchor's structure: four full [N, V] logit tensors and their fp32 softmax copies."""
    import torch
    import torch.nn.functional as F

    student_w, teacher_w = inputs["student_w"], inputs["teacher_w"]
    h_s, h_t, labels = inputs["h_s"], inputs["h_t"], inputs["labels"]
    student_logits = h_s @ student_w.T
    with torch.no_grad():
        teacher_logits = h_t @ teacher_w.T
        teacher_pred = teacher_logits.argmax(-1)
    t2s_logits = (h_t @ inputs["projector_w"].T) @ student_w.detach().T
    ce_t2s = F.cross_entropy(t2s_logits.float(), teacher_pred, reduction="sum")
    agree = t2s_logits.argmax(-1) == teacher_pred
    kd_t2s = (_naive_fkl_rows(student_logits, t2s_logits.detach()) * agree).sum()
    s2t_logits = (h_s @ inputs["s2t_matrix"].T) @ teacher_w.T
    kd_s2t = _naive_fkl_rows(s2t_logits, teacher_logits).sum()
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    return {"ce": ce, "kd_t2s": kd_t2s, "ce_t2s": ce_t2s, "kd_s2t": kd_s2t}


def chunked_loss(inputs: dict, chunk_size: int) -> dict:
    """dskd_scale's loss as the engine runs it: the student head is a ``TrainableHead`` (one ``[V, D]``
    gradient accumulator filled in the forward), told that every term is backpropagated with weight 1."""
    import torch
    import torch.nn.functional as F

    from dskd_scale.losses import DSKDOptions, TrainableHead, dskd_loss

    student_w, teacher_w = inputs["student_w"], inputs["teacher_w"]
    head = inputs["student_head"] = TrainableHead(student_w)
    terms = dskd_loss(
        inputs["h_s"],
        inputs["h_t"],
        student_head=head,
        student_head_frozen=lambda h: F.linear(h, student_w.detach()),
        teacher_head=lambda h: F.linear(h, teacher_w),
        t2s_projector=lambda h: F.linear(h, inputs["projector_w"]),
        s2t_map=lambda h: F.linear(h, inputs["s2t_matrix"]),
        teacher_to_student_ids=torch.arange(teacher_w.shape[0]),
        options=DSKDOptions(temperature=TEMPERATURE, chunk_size=chunk_size),
        student_labels_A=inputs["labels"],
        head_grad_weights={"kd_t2s": 1.0, "ce": 1.0},
    )
    return {name: terms[name][0] for name in ("ce", "kd_t2s", "ce_t2s", "kd_s2t")}


def make_inputs(vocab: int, tokens: int, device: str = "cpu", seed: int = 0) -> dict:
    """The same values on every device (drawn on the CPU, then moved; a no-op on the CPU)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    # In-place scaling: a `randn(...) * s` temporary of the [V, E] teacher head (1.2 GB at 152k) would set the
    # process's peak RSS before the loss runs, hiding the loss's own peak below it.
    values = {
        "student_w": torch.randn(vocab, STUDENT_HIDDEN, generator=gen).mul_(STUDENT_HIDDEN**-0.5),
        "teacher_w": torch.randn(vocab, TEACHER_HIDDEN, generator=gen).mul_(TEACHER_HIDDEN**-0.5),
        "projector_w": torch.randn(STUDENT_HIDDEN, TEACHER_HIDDEN, generator=gen).mul_(TEACHER_HIDDEN**-0.5),
        "s2t_matrix": torch.randn(TEACHER_HIDDEN, STUDENT_HIDDEN, generator=gen).mul_(STUDENT_HIDDEN**-0.5),
        "h_s": torch.randn(tokens, STUDENT_HIDDEN, generator=gen),
        "h_t": torch.randn(tokens, TEACHER_HIDDEN, generator=gen).mul_(3),
        "labels": torch.randint(0, vocab, (tokens,), generator=gen),
    }
    inputs = {name: value.to(device) for name, value in values.items()}
    for name in ("student_w", "projector_w", "h_s"):
        inputs[name].requires_grad_(True)
    return inputs


def _collect_head_gradient(inputs: dict) -> None:
    """The chunked variant's head gradient, as the engine takes it after the backward (scaled in place)."""
    head = inputs.pop("student_head", None)
    if head is not None:
        inputs["student_w"].grad = head.take_gradient()


def _drop_gradients(inputs: dict) -> None:
    """As ``optimizer.zero_grad()`` (set_to_none=True, PyTorch's default) before the baseline is read: the
    measured backward creates the gradients, so both variants' working memory includes them."""
    for name in ("student_w", "projector_w", "h_s"):
        inputs[name].grad = None


def _one_pass(loss_fn, inputs: dict) -> dict:
    terms = loss_fn(inputs)
    sum(terms.values()).backward()
    _collect_head_gradient(inputs)
    return terms


def run_child(variant: str, vocab: int, tokens: int, chunk_size: int, device: str) -> None:
    """Inside the child: one warm-up on 8 rows, then the measured pass(es); prints one JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    inputs = make_inputs(vocab, tokens, device)
    loss_fn = naive_loss if variant == "naive" else lambda x: chunked_loss(x, chunk_size)
    warm = {k: (v[:8] if k in ("h_s", "h_t", "labels") else v) for k, v in inputs.items()}
    baseline_mb = _rss_mb()
    _one_pass(loss_fn, warm)
    if device == "cpu":
        _drop_gradients(inputs)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        terms = _one_pass(loss_fn, inputs)
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        measured = {"seconds": seconds, "time_s": cpu_seconds, "baseline_mb": baseline_mb, "peak_mb": peak_mb}
    else:
        measured = {"seconds": float("inf"), "baseline_mb": 0.0, "peak_mb": 0.0}
        for _ in range(3):
            _drop_gradients(inputs)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline_mb = torch.cuda.memory_allocated(device) / 2**20
            start = time.perf_counter()
            terms = _one_pass(loss_fn, inputs)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            if peak_mb - baseline_mb > measured["peak_mb"] - measured["baseline_mb"]:
                measured.update(baseline_mb=baseline_mb, peak_mb=peak_mb)
            measured["seconds"] = min(measured["seconds"], seconds)
        measured["time_s"] = measured["seconds"]
    measured["terms"] = {k: float(v.detach()) for k, v in terms.items()}
    print(json.dumps(measured))


def measure(variant: str, vocab: int, tokens: int, chunk_size: int, device: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, str(vocab), str(tokens), str(chunk_size), device]
    # A fixed mmap threshold stops glibc from serving freed multi-MB tensors out of its heap (its dynamic
    # threshold rises to 32 MB), which would make RSS measure allocator fragmentation; same for both variants.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} V={vocab} N={tokens} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--only", choices=sorted(SIZES), help="run one size only (the SUMMARY then lists it alone)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the losses run")
    parser.add_argument("--child", nargs=5, metavar=("VARIANT", "VOCAB", "TOKENS", "CHUNK", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, vocab, tokens, chunk, device = args.child
        run_child(variant, int(vocab), int(tokens), int(chunk), device)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to torch")
    clock = "CPU" if args.device == "cpu" else "GPU wall"
    summary = {}
    for label, (vocab, tokens) in (QUICK_SIZES if args.quick else SIZES).items():
        if args.only and label != args.only:
            continue
        chunked = measure("chunked", vocab, tokens, args.chunk_size, args.device)
        naive = measure("naive", vocab, tokens, args.chunk_size, args.device)
        for name, value in naive["terms"].items():
            ours = chunked["terms"][name]
            if abs(ours - value) > 1e-3 * max(1.0, abs(value)):
                raise RuntimeError(f"{label}: term {name} differs: chunked {ours} vs naive {value}")
        work_chunked = chunked["peak_mb"] - chunked["baseline_mb"]
        work_naive = naive["peak_mb"] - naive["baseline_mb"]
        mem_ratio, time_ratio = work_chunked / work_naive, chunked["time_s"] / naive["time_s"]
        print(
            f"V={vocab} N={tokens} chunk={args.chunk_size} {args.device}: loss working memory {work_chunked:.0f} MB "
            f"vs naive {work_naive:.0f} MB (ratio {mem_ratio:.3f}); peak {chunked['peak_mb']:.0f} vs "
            f"{naive['peak_mb']:.0f} MB; fwd+bwd {clock} {chunked['time_s']:.3f} s vs {naive['time_s']:.3f} s "
            f"(ratio {time_ratio:.3f}; wall {chunked['seconds']:.3f} s vs {naive['seconds']:.3f} s)",
            flush=True,
        )
        summary[f"mem_ratio_{label}"] = round(mem_ratio, 3)
        summary[f"time_ratio_{label}"] = round(time_ratio, 3)
        summary[f"peak_ratio_{label}"] = round(chunked["peak_mb"] / naive["peak_mb"], 3)
    order = ["mem_ratio_152k", "time_ratio_152k", "mem_ratio_32k", "time_ratio_32k"]
    order += ["peak_ratio_152k", "peak_ratio_32k"]
    print("SUMMARY " + " ".join(f"{key}={summary[key]}" for key in order if key in summary))


if __name__ == "__main__":
    main()
