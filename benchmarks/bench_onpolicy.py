#!/usr/bin/env python
"""On-policy DSKD-ETA step costs on 2 ZeRO-3 CPU ranks, and online vs offline alignment pairs.

    python benchmarks/bench_onpolicy.py [--quick] [--steps 3] [--rows 128] [--new-tokens 48] [--out DIR]

Everything is measured in ONE invocation, side by side, on real Dolly rows and real tokenizers from the shared
assets, across vocabularies: teacher GPT-2 (byte-level BPE, 50257) and student Llama-2 (SentencePiece, 32000),
random Llama-style models sized like ``bench_step.py``'s (student 256 x 6 layers, teacher 384 x 8).
1. ``gather_once_vs_per_token``: a 2-rank ZeRO-3 run (torchrun, gloo); per step the same prompts and the same
   generator seed are decoded by ``engine.rollout.generate_rollouts`` (the student gathered once into a replica)
   and by ``generate_rollouts_per_token_gather`` (through the ZeRO-3 hooks: every forward all-gathers every
   layer). Both sample the same tokens (checked), so the ratio of their wall times compares like with like.
   Sampling as the run config's ``kd.on_policy`` defaults (temperature 1, no top-k / top-p). Goal <= 0.25.
2. ``online_align_share``: the same run's on-policy step, timed part by part exactly as ``loop.train`` runs it:
   rollout (gather-once), decode + teacher re-tokenisation + online alignment + collate
   (``onpolicy.rollout_micro_batches`` minus the generation inside it), teacher forward, student forward,
   criterion, backward and optimizer step. Share = alignment / whole step (slowest rank per part, median over
   the timed steps after one warm-up step). Goal <= 0.03.
3. ``online_vs_offline_pairs``: every row of a Dolly prealignment (``run_prealign``, no truncation, whitespace
   ``exact`` and ``paper``) is fed to ``alignment.online.align_rollouts`` as a rollout (the student's gold
   response ids as sampled ids, the prompt text recovered from the prompt ids); the fraction of rows whose online
   pairs equal the shard's. Goal = 1.0.
Ends with ``SUMMARY online_align_share=<a> gather_once_vs_per_token=<g> online_vs_offline_pairs=<p>``.
``--quick``: a short pipeline check (fewer rows, tokens and layers); its numbers are not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TEACHER_TOKENIZER, STUDENT_TOKENIZER = "tokenizers/gpt2", "tokenizers/llama2"
STUDENT = {"architecture": "llama", "hidden_size": 256, "num_layers": 6, "num_heads": 4, "intermediate_size": 688}
TEACHER = {"architecture": "llama", "hidden_size": 384, "num_layers": 8, "num_heads": 6, "intermediate_size": 1024}
QUICK_LAYERS = 2
TRAIN_MAX_LENGTH = 192


# ---- data ----------------------------------------

def prepare(work: Path, rows: int) -> dict[str, Path]:
    """Dolly rows; prealigned training shards (max_length 192) and untruncated shards for the pair comparison."""
    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
    from dskd_scale.utils.assets import asset_path

    paths = {"dolly": asset_path("data/dolly/dev.jsonl"), "teacher_tokenizer": asset_path(TEACHER_TOKENIZER),
             "student_tokenizer": asset_path(STUDENT_TOKENIZER)}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise SystemExit(f"benchmark needs the shared assets ({', '.join(missing)}); set DSKD_ASSETS")
    subset = work / "dolly.jsonl"
    subset.write_text("\n".join(paths["dolly"].read_text(encoding="utf-8").splitlines()[:rows]) + "\n",
                      encoding="utf-8")
    common = {"teacher_tokenizer": str(paths["teacher_tokenizer"]),
              "student_tokenizer": str(paths["student_tokenizer"]), "data": (str(subset),)}
    run_prealign(PrealignConfig(**common, out=str(work / "shards"), max_length=TRAIN_MAX_LENGTH))
    for whitespace in ("exact", "paper"):
        run_prealign(PrealignConfig(**common, out=str(work / f"whole_{whitespace}"), max_length=8192,
                                    whitespace=whitespace))
    return {**paths, "shards": work / "shards"}


def online_vs_offline(work: Path, paths: dict[str, Path]) -> dict:
    """Per whitespace mode: rows whose online pairs equal the offline shard's, and the rows compared."""
    import numpy as np
    from transformers import AutoTokenizer

    from dskd_scale.alignment.online import align_rollouts, prompt_text
    from dskd_scale.data.dataset import PrealignedDataset
    from dskd_scale.data.format import IGNORE_INDEX

    teacher = AutoTokenizer.from_pretrained(str(paths["teacher_tokenizer"]))
    student = AutoTokenizer.from_pretrained(str(paths["student_tokenizer"]))
    result = {}
    for whitespace in ("exact", "paper"):
        dataset = PrealignedDataset.open(work / f"whole_{whitespace}", expected_teacher_fingerprint=None,
                                         expected_student_fingerprint=None)
        rows = [dataset[i] for i in range(len(dataset))]
        prompts, prompt_ids, responses = [], [], []
        for row in rows:
            ids = np.asarray(row["student_input_ids"], dtype=np.int64)
            first = int(np.argmax(np.asarray(row["student_labels"]) != IGNORE_INDEX))
            prompt_ids.append(ids[:first])
            responses.append(ids[first:])  # the gold response ids as sampled ids, EOS included
            prompts.append(prompt_text(student, ids[:first]))
        start = time.perf_counter()
        online = align_rollouts(teacher, student, prompts, prompt_ids, responses, whitespace=whitespace)
        seconds = time.perf_counter() - start
        equal = sum(np.array_equal(o.align_student, r["align_student"]) and np.array_equal(o.align_teacher,
                                                                                          r["align_teacher"])
                    for o, r in zip(online, rows, strict=True))
        result[whitespace] = {"equal": int(equal), "rows": len(rows), "align_seconds": seconds,
                              "pairs": int(sum(o.align_student.size for o in online))}
    return result


# ---- worker (runs under torchrun) ----------------------------------------

def run_overrides(args, out: Path) -> list[str]:
    layers = {"num_layers": QUICK_LAYERS} if args.quick else {}
    items = [f"output_dir={out}", f"data.train_dir={Path(args.work) / 'shards'}", "data.micro_batch_size=4",
             "optim.grad_accum=1", "optim.max_steps=1000", "optim.warmup_steps=0", "log.progress_bar=false",
             "log.tensorboard=false", "checkpoint.every_steps=0", "checkpoint.resume=never",
             "checkpoint.export_at_end=false", "engine.skip_cpu_shm_op=true", "kd.chunk_size=1024",
             f"teacher.tokenizer={args.teacher_tokenizer}", f"student.tokenizer={args.student_tokenizer}"]
    for role, shape in (("student", STUDENT), ("teacher", TEACHER)):
        items += [f"{role}.{key}={value}" for key, value in {**shape, **layers}.items()]
        items.append(f"{role}.max_position_embeddings=1024")
    return items


def train_micro_batches(setup, micro: list[dict]) -> tuple[float, float]:
    """One optimizer step on ``micro`` as ``loop.train`` runs it; returns (teacher seconds, student seconds)."""
    import torch

    from dskd_scale.criteria import batch_rows, combine, compute_terms, head_grad_weights, local_counts
    from dskd_scale.engine.distributed import all_reduce_sum, device

    engines, kd, world = setup.engines, setup.cfg.kd, setup.world_size
    micro = [{k: v.to(device()) if hasattr(v, "to") else v for k, v in batch.items()} for batch in micro]
    rows = [batch_rows(batch) for batch in micro]
    counts: dict[str, float] = {}
    for row, batch in zip(rows, micro, strict=True):
        for name, value in local_counts(kd, row, batch).items():
            counts[name] = counts.get(name, 0.0) + float(value)
    names = sorted(counts)
    packed = all_reduce_sum(torch.tensor([counts[n] for n in names], dtype=torch.float64, device=device()))
    global_counts = dict(zip(names, packed.tolist(), strict=True))
    weights = head_grad_weights(kd, global_counts, world_size=world, grad_accum_steps=len(micro))
    teacher_seconds = student_seconds = 0.0
    start = time.perf_counter()
    engines.student_head.refresh()
    student_seconds += time.perf_counter() - start
    for batch, row in zip(micro, rows, strict=True):
        start = time.perf_counter()
        with torch.no_grad():
            teacher_hidden = engines.teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        middle = time.perf_counter()
        student_hidden = engines.student(batch["student_input_ids"], batch["student_attention_mask"])
        terms = compute_terms(kd, row, student_hidden, teacher_hidden, engines, batch=batch,
                              head_grad_weights=weights)
        loss, _ = combine(kd, terms, global_counts, world_size=world, grad_accum_steps=len(micro))
        engines.backward(loss)
        engines.student.step()
        end = time.perf_counter()
        teacher_seconds += middle - start
        student_seconds += end - middle
    return teacher_seconds, student_seconds


def worker(args) -> None:
    import torch

    from dskd_scale.config.loader import load_config
    from dskd_scale.config.run import RunConfig
    from dskd_scale.data.format import read_manifest
    from dskd_scale.engine.distributed import all_reduce_max, barrier, device, rank
    from dskd_scale.engine.rollout import SamplingSettings, generate_rollouts, generate_rollouts_per_token_gather
    from dskd_scale.onpolicy.batch import rollout_micro_batches, step_prompts
    from dskd_scale.train_setup import setup_run

    out = Path(args.work) / "run"
    cfg = load_config(RunConfig, ROOT / "configs/tests/tiny_dskd_eta.yaml", run_overrides(args, out))
    setup = setup_run(cfg)
    engines = setup.engines
    collator = setup.train_loader.collator
    whitespace = read_manifest(cfg.data.train_dir).get("alignment", {}).get("whitespace", "exact")
    options = cfg.kd.on_policy  # the run config's sampling defaults, as the loop uses them
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=options.temperature, top_p=options.top_p,
                                top_k=options.top_k)
    special = {"eos_id": int(engines.student_tokenizer.eos_token_id), "pad_id": collator.student_pad_id}
    batches = iter(setup.train_loader)
    engines.student.train()
    steps = []
    for step in range(args.steps + 1):  # step 0 warms up
        micro = [next(batches)]
        seed = 1000 + 17 * step + rank()
        prompts = [p for batch in micro for p in step_prompts(batch) if p is not None]
        barrier()
        start = time.perf_counter()
        hooked = generate_rollouts_per_token_gather(engines, prompts, settings,
                                                    generator=torch.Generator().manual_seed(seed), **special)
        per_token_seconds = time.perf_counter() - start
        generated: dict = {}

        def generate(step_prompt_ids, generated=generated, seed=seed):
            begin = time.perf_counter()
            generated["rollouts"] = generate_rollouts(engines, step_prompt_ids, settings,
                                                      generator=torch.Generator().manual_seed(seed), **special)
            generated["seconds"] = time.perf_counter() - begin
            return generated["rollouts"]

        barrier()
        step_start = time.perf_counter()
        on_policy, stats = rollout_micro_batches(micro, generate, student_tokenizer=engines.student_tokenizer,
                                                 teacher_tokenizer=engines.teacher_tokenizer, collator=collator,
                                                 whitespace=whitespace)
        online_seconds = time.perf_counter() - step_start - generated["seconds"]
        teacher_seconds, student_seconds = train_micro_batches(setup, on_policy)
        step_seconds = time.perf_counter() - step_start
        same = all(a.tolist() == b.tolist() for a, b in zip(hooked, generated["rollouts"], strict=True))
        parts = [per_token_seconds, generated["seconds"], online_seconds, teacher_seconds, student_seconds,
                 step_seconds, 0.0 if same else 1.0, float(stats.generated_tokens), float(stats.aligned_pairs),
                 float(stats.rollouts)]
        slowest = all_reduce_max(torch.tensor(parts, dtype=torch.float64, device=device())).tolist()
        steps.append(dict(zip(["per_token_seconds", "rollout_seconds", "align_seconds", "teacher_seconds",
                               "student_seconds", "step_seconds", "tokens_differ", "generated_tokens",
                               "aligned_pairs", "rollouts"], slowest, strict=True)))
    if rank() == 0:
        Path(args.result).write_text(json.dumps({"steps": steps, "sampling": repr(settings)}))


# ---- driver ----------------------------------------

def launch(args, paths: dict[str, Path]) -> list[dict]:
    result = Path(args.work) / "steps.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", "29748", __file__, "--worker", "--work", str(args.work), "--result", str(result),
               "--steps", str(args.steps), "--new-tokens", str(args.new_tokens),
               "--teacher-tokenizer", str(paths["teacher_tokenizer"]),
               "--student-tokenizer", str(paths["student_tokenizer"])]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short pipeline check (not the benchmark's numbers)")
    parser.add_argument("--steps", type=int, default=None, help="timed on-policy steps after one warm-up step")
    parser.add_argument("--rows", type=int, default=None, help="Dolly rows to prealign")
    parser.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens of each rollout")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--student-tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"steps": 1, "rows": 24, "new_tokens": 8} if args.quick else {"steps": 3, "rows": 128,
                                                                           "new_tokens": 48}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        worker(args)
        return 0
    args.work = args.out or Path(tempfile.mkdtemp(prefix="bench_onpolicy_"))
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.rows)
    pairs = online_vs_offline(args.work, paths)
    run = launch(args, paths)
    steps, timed = run["steps"], run["steps"][1:]

    def median(key: str) -> float:
        return statistics.median(step[key] for step in timed)

    share = statistics.median(step["align_seconds"] / step["step_seconds"] for step in timed)
    gather_ratio = statistics.median(step["rollout_seconds"] / step["per_token_seconds"] for step in timed)
    equal = sum(mode["equal"] for mode in pairs.values())
    compared = sum(mode["rows"] for mode in pairs.values())
    print(json.dumps({"steps": steps, "online_vs_offline": pairs}, indent=2))
    print(f"rollout ({run['sampling']}, 4 prompts per rank): gather once {median('rollout_seconds'):.3f}s "
          f"vs through the ZeRO-3 hooks {median('per_token_seconds'):.3f}s (ratio {gather_ratio:.3f}); same tokens "
          f"in every step: {all(step['tokens_differ'] == 0 for step in steps)}")
    print(f"on-policy step {median('step_seconds'):.3f}s: rollout {median('rollout_seconds'):.3f}s, decode + teacher "
          f"re-tokenisation + alignment {median('align_seconds'):.4f}s (share {share:.4f}), teacher forward "
          f"{median('teacher_seconds'):.3f}s, student forward/backward/step {median('student_seconds'):.3f}s")
    for mode, counts in pairs.items():
        print(f"online vs offline pairs ({mode}): {counts['equal']}/{counts['rows']} rows equal, "
              f"{counts['pairs']} pairs, online alignment {counts['align_seconds']:.3f}s")
    print(f"SUMMARY online_align_share={share:.4f} gather_once_vs_per_token={gather_ratio:.3f} "
          f"online_vs_offline_pairs={equal / max(compared, 1):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
