#!/usr/bin/env python
"""Step cost of DSKD vs vanilla KD, dynamic padding vs pad-to-512, and ZeRO-3 memory at 2 vs 1 rank.

    python benchmarks/bench_step.py [--steps 4] [--rows 256] [--out DIR]

Everything is measured in ONE invocation, side by side, on real Dolly rows (shared assets):
1. A 2-rank ZeRO-3 run (torchrun, gloo) of ``vanilla_kd`` then ``dskd`` with the same teacher/student sharing one
   tokenizer (a BPE of 8192 tokens trained here on Dolly, so head/body FLOP proportions resemble Qwen2.5-7B ->
   1.5B in miniature: body/head ~4.5 for the student, ~9 for the teacher), median step time after a warm-up step.
   The analytic lower bound of the ratio counts the FLOPs of bodies and heads at the measured token counts: DSKD
   adds t2s (projector + frozen student head, forward and input-gradient backward) and s2t (map + frozen teacher
   head, same) per aligned token, plus the per-step s2t map rebuild.
2. Tokens/s of the real loader (dynamic padding, length grouping) vs the same ``sft`` run with every batch padded
   to 512 tokens, on Dolly's real length distribution.
3. Model-state bytes per rank (parameter partitions, fp32 master weights, Adam moments, teacher partition) with 2
   ranks vs 1 rank.
4. The same 2-rank ``dskd`` run with ``teacher.placement=replicated`` (a full frozen teacher per rank, no per-step
   all-gathers of its weights) vs the ZeRO-3 teacher: median step time ratio (goal <= 0.9) and model-state bytes.
Ends with ``SUMMARY dskd_vs_kd=<x> dskd_vs_kd_bound=<y> dynpad_speedup=<z> zero3_mem_2v1=<w>
replicated_vs_zero3_teacher=<r> replicated_vs_zero3_mem=<m>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

VOCAB = 8192
STUDENT = {"architecture": "qwen2", "hidden_size": 256, "num_layers": 12, "num_heads": 4, "intermediate_size": 704}
TEACHER = {"architecture": "qwen2", "hidden_size": 384, "num_layers": 16, "num_heads": 6, "intermediate_size": 1056}
PAD_TO = 512


# ---- data ----------------------------------------

def prepare(work: Path, rows: int) -> dict[str, Path]:
    """A BPE tokenizer trained on Dolly dev, and prealigned shards (same tokenizer on both sides)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
    from dskd_scale.utils.assets import asset_path

    dolly = asset_path("data/dolly/dev.jsonl")
    if dolly is None:
        raise SystemExit("benchmark needs the shared assets (data/dolly/dev.jsonl); set DSKD_ASSETS")
    lines = dolly.read_text().splitlines()
    texts = []
    for line in lines:
        record = json.loads(line)
        output = record["output"][0] if isinstance(record["output"], list) else record["output"]
        texts.append(record["prompt"] + output)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(work / "tokenizer")
    subset = work / "dolly.jsonl"
    subset.write_text("\n".join(lines[:rows]) + "\n")
    run_prealign(PrealignConfig(teacher_tokenizer=str(work / "tokenizer"), student_tokenizer=str(work / "tokenizer"),
                                data=(str(subset),), out=str(work / "shards"), max_length=PAD_TO))
    return {"tokenizer": work / "tokenizer", "shards": work / "shards"}


def overrides(paths: dict[str, Path], out: Path, criterion: str, steps: int, placement: str = "zero3") -> list[str]:
    items = [f"kd.criterion={criterion}", f"output_dir={out}", f"data.train_dir={paths['shards']}",
             "data.micro_batch_size=4", "optim.grad_accum=1", f"optim.max_steps={steps}", "optim.warmup_steps=0",
             "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false", "checkpoint.every_steps=0",
             "checkpoint.resume=never", "checkpoint.export_at_end=false", "engine.skip_cpu_shm_op=true",
             "kd.chunk_size=1024", f"teacher.placement={placement}"]
    for role, shape in (("student", STUDENT), ("teacher", TEACHER)):
        items.append(f"{role}.tokenizer={paths['tokenizer']}")
        items += [f"{role}.{key}={value}" for key, value in shape.items()]
    return items


# ---- worker (runs under torchrun) ----------------------------------------

def model_state_bytes(engines) -> int:
    """This rank's resident model states: parameter partitions (student, projectors, teacher) + optimizer states."""
    total = 0
    for engine in (engines.student, engines.teacher):
        if engine is None:
            continue
        for param in engine.module.parameters():
            local = getattr(param, "ds_tensor", None)
            total += (local if local is not None else param).numel() * param.element_size()
    optimizer = engines.student.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))
    for group in getattr(optimizer, "fp32_partitioned_groups_flat", []):
        total += group.numel() * group.element_size()
    return total


def pad_collator(collator, length: int):
    """Wrap a Collator so every batch is padded to ``length`` on both sides (the anchor's fixed padding)."""
    import torch

    def collate(examples):
        batch = collator(examples)
        for side, pad_id in (("student", collator.student_pad_id), ("teacher", collator.teacher_pad_id)):
            width = batch[f"{side}_input_ids"].shape[1]
            extra = length - width
            if extra > 0:
                for key, value in ((f"{side}_input_ids", pad_id), (f"{side}_attention_mask", 0),
                                   (f"{side}_labels", -100)):
                    batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        return batch

    return collate


def token_counts(loader, steps: int) -> tuple[float, float]:
    """Mean (all tokens, label tokens) per micro-batch over the first ``steps`` batches of this rank."""
    import itertools

    tokens, labels = [], []
    for batch in itertools.islice(iter(loader), steps):
        tokens.append(float(batch["student_attention_mask"].sum()))
        labels.append(float((batch["student_labels"][:, 1:] != -100).sum()))
    loader.sampler.set_epoch(0)
    return statistics.mean(tokens), statistics.mean(labels)


def worker(args) -> None:
    from dskd_scale.config.loader import load_config
    from dskd_scale.config.run import RunConfig
    from dskd_scale.engine.distributed import barrier, rank
    from dskd_scale.loop import train
    from dskd_scale.train_setup import setup_run

    paths = {"tokenizer": Path(args.work) / "tokenizer", "shards": Path(args.work) / "shards"}
    results = {}
    for name, criterion, padded, placement in args.variants:
        out = Path(args.work) / f"run_{name}_{args.world}"
        cfg = load_config(RunConfig, ROOT / "configs/tests/tiny_dskd.yaml",
                          overrides(paths, out, criterion, args.steps + 1, placement))
        setup = setup_run(cfg)
        results[f"{name}/model_state_bytes"] = model_state_bytes(setup.engines)
        if args.memory_only:
            continue
        if padded:
            setup.train_loader.collator = pad_collator(setup.train_loader.collator, PAD_TO)
        tokens, labels = token_counts(setup.train_loader, args.steps + 1)
        train(setup)
        barrier()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [row for row in rows if row["step"] > 1]
        results[f"{name}/step_seconds"] = statistics.median(row["perf/step_seconds"] for row in timed)
        results[f"{name}/tokens_per_s"] = statistics.median(row["perf/tokens_per_s"] for row in timed)
        results[f"{name}/tokens_per_micro_batch"] = tokens
        results[f"{name}/labels_per_micro_batch"] = labels
    if rank() == 0:
        Path(args.result).write_text(json.dumps(results))


# ---- analytic bound ----------------------------------------

def body_params(shape: dict) -> int:
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    return layers * (4 * d * d + 3 * d * f)


def dskd_vs_kd_bound(tokens: float, labels: float) -> float:
    """FLOPs(dskd step) / FLOPs(vanilla KD step) per micro-batch; 2 FLOPs per multiply-add."""
    d, e, v = STUDENT["hidden_size"], TEACHER["hidden_size"], VOCAB
    teacher = 2 * body_params(TEACHER) * tokens + 2 * v * e * labels  # forward only, logits at label rows
    student = 6 * body_params(STUDENT) * tokens + 6 * v * d * labels  # forward + backward, head once for CE + KD
    kd = teacher + student
    t2s = 6 * e * d * labels + 4 * v * d * labels  # projector fwd/bwd (input+weight); frozen head fwd + input grad
    s2t = 4 * d * e * labels + 4 * v * e * labels  # map fwd + input grad; frozen teacher head fwd + input grad
    rebuild = 2 * e * v * d  # Q = pinv(W_t^O) @ W_s^O once per step
    return (kd + t2s + s2t + rebuild) / kd


# ---- driver ----------------------------------------

def launch(work: Path, world: int, port: int, variants: list[str], steps: int, memory_only: bool) -> dict:
    result = work / f"result_{world}_{'mem' if memory_only else 'run'}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--work", str(work), "--world",
               str(world), "--result", str(result), "--steps", str(steps), "--variants", *variants]
    if memory_only:
        command.append("--memory-only")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rows", type=int, default=192, help="Dolly rows to prealign")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        table = {"kd": ("vanilla_kd", False, "zero3"), "dskd": ("dskd", False, "zero3"),
                 "dynpad": ("sft", False, "zero3"), "pad512": ("sft", True, "zero3"),
                 "dskd_replicated": ("dskd", False, "replicated")}
        args.variants = [(name, *table[name]) for name in args.variants]
        worker(args)
        return 0
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_step_"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.rows)
    two = launch(work, 2, 29590, ["kd", "dskd", "dskd_replicated", "dynpad", "pad512"], args.steps,
                 memory_only=False)
    one = launch(work, 1, 29592, ["dskd"], args.steps, memory_only=True)
    measured = two["dskd/step_seconds"] / two["kd/step_seconds"]
    bound = dskd_vs_kd_bound(two["dskd/tokens_per_micro_batch"], two["dskd/labels_per_micro_batch"])
    dynpad = two["dynpad/tokens_per_s"] / two["pad512/tokens_per_s"]
    memory = two["dskd/model_state_bytes"] / one["dskd/model_state_bytes"]
    replicated = two["dskd_replicated/step_seconds"] / two["dskd/step_seconds"]
    replicated_mem = two["dskd_replicated/model_state_bytes"] / two["dskd/model_state_bytes"]
    print(json.dumps({"two_ranks": two, "one_rank": one}, indent=2))
    print(f"step time: dskd {two['dskd/step_seconds']:.3f}s vs vanilla_kd {two['kd/step_seconds']:.3f}s "
          f"(ratio {measured:.3f}, FLOP lower bound {bound:.3f}, measured/bound {measured / bound:.3f})")
    print(f"tokens/s: dynamic padding {two['dynpad/tokens_per_s']:.0f} vs pad-to-{PAD_TO} "
          f"{two['pad512/tokens_per_s']:.0f} ({dynpad:.2f}x)")
    print(f"model states per rank: 2 ranks {two['dskd/model_state_bytes'] / 2**20:.1f} MiB vs 1 rank "
          f"{one['dskd/model_state_bytes'] / 2**20:.1f} MiB ({memory:.3f})")
    print(f"teacher placement (dskd, 2 ranks): replicated {two['dskd_replicated/step_seconds']:.3f}s vs ZeRO-3 "
          f"{two['dskd/step_seconds']:.3f}s per step ({replicated:.3f}); model states per rank "
          f"{two['dskd_replicated/model_state_bytes'] / 2**20:.1f} vs {two['dskd/model_state_bytes'] / 2**20:.1f} MiB")
    print(f"SUMMARY dskd_vs_kd={measured:.3f} dskd_vs_kd_bound={bound:.3f} dynpad_speedup={dynpad:.2f} "
          f"zero3_mem_2v1={memory:.3f} replicated_vs_zero3_teacher={replicated:.3f} "
          f"replicated_vs_zero3_mem={replicated_mem:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
