#!/usr/bin/env python
"""`make demo`: distil a teacher into a smaller student with a different tokenizer, end to end, on CPU.

The setting is the one distillation exists for: the teacher knows more than the student's own labels show. Every
question asks for a fact (the capital, language or flag colour of an invented country, the opposite of a word;
``dskd_scale/demo/knowledge.py``). The teacher learns the facts from a large clean set (3000 examples). The student
gets a small set of its own (600 examples, each fact asked about 7 times) in which 40 % of the answers state a
wrong fact, as a hurried annotator would. Both students see exactly the same examples, steps, batch and learning
rate; one learns from the labels alone (SFT), the other from the labels and the teacher (DSKD with exact token
alignment, alpha = weight of the teacher). Validation and test sets are clean and ask the same facts again; every
choice was made on the validation split, never on the test split.

Every step runs the product's own entry points, the way a user would:

1. generate the demo data and two different tokenizers (`tools/make_demo_assets.py`);
2. prealign it offline (`tools/prealign.py`): teacher→teacher for the teacher's SFT, teacher→student for the
   student's set and for the validation set (the students' held-out CE);
3. train the teacher with SFT (`launch/train.py`, one process) and export it;
4. per seed, distil a smaller student of another architecture with `dskd_eta` (2 ranks, ZeRO-3, the `deepspeed`
   launcher), and train the same student with SFT only on the same budget;
5. evaluate the teacher and every student on the held-out test set (`tools/evaluate.py`, greedy: exact match,
   ROUGE-L), print the seed-averaged table, write it as ``OUT/results.json``, and say where the TensorBoard logs are.

    python tools/demo.py --out demo_out [--ranks 2] [--seeds 10,20] [--teacher-steps 1500] [--student-steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONFIGS = ROOT / "configs" / "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(step: str, command: list[str], log_file: Path, env: dict[str, str] | None = None) -> None:
    """Run one step, teeing its output to ``log_file``; stop the demo with the log's tail if it fails."""
    print(f"\n=== {step}\n$ {' '.join(map(str, command))}", flush=True)
    started = time.perf_counter()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if _worth_showing(line):
                print("   " + line.rstrip(), flush=True)
        code = process.wait()
    if code != 0:
        tail = log_file.read_text().splitlines()[-40:]
        sys.exit(f"demo step '{step}' failed (exit {code}); last lines of {log_file}:\n" + "\n".join(tail))
    print(f"--- {step}: done in {time.perf_counter() - started:.0f} s (log: {log_file})", flush=True)


def _worth_showing(line: str) -> bool:
    """Keep the console readable: summaries and metrics, not launcher chatter or progress-bar redraws."""
    noisy = ("[INFO]", "[WARNING]", "Setting accelerator", "%|", "UserWarning", "warnings.warn", "FutureWarning",
             "return func(")
    return bool(line.strip()) and not any(token in line for token in noisy)


def train_command(ranks: int, launcher: str, config: Path, overrides: list[str]) -> list[str]:
    script = [str(ROOT / "launch" / "train.py"), "--config", str(config), *overrides]
    if ranks == 1:
        return [PYTHON, *script]
    if launcher == "deepspeed":
        return [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
                *script]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port()), *script]


def prealign(data: Path, teacher_tokenizer: Path, student_tokenizer: Path, target: Path, logs: Path) -> None:
    run(f"prealign {data.name}: {teacher_tokenizer.name} -> {student_tokenizer.name}", [
        PYTHON, str(ROOT / "tools" / "prealign.py"), "--teacher-tokenizer", str(teacher_tokenizer),
        "--student-tokenizer", str(student_tokenizer), "--data", str(data),
        "--prompt-field", "prompt", "--response-field", "output", "--max-length", "256", "--num-shards", "2",
        "--report-examples", "2", "--ignore-fields", "task,noisy", "--out", str(target),
    ], logs / f"prealign_{target.name}.log")


def evaluate(name: str, model: Path, test_file: Path, out: Path, logs: Path, limit: int) -> Path:
    results = out / "eval" / f"{name}.json"
    run(f"evaluate {name}", [
        PYTHON, str(ROOT / "tools" / "evaluate.py"), "--model", str(model), "--suite", "demo",
        "--data-path", f"demo={test_file}", "--greedy", "--max-new-tokens", "48", "--batch-size", "32",
        "--limit", str(limit), "--device", "cpu", "--dtype", "fp32", "--out", str(results),
    ], logs / f"eval_{name}.log")
    return results


def held_out_ce(run_dir: Path) -> float | None:
    """The last logged ``eval/ce`` of a training run (its eval split), None when it logged none."""
    value = None
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            value = json.loads(line).get("eval/ce", value)
    return value


def exact_match_by_task(records_dir: Path, tasks: list[str]) -> dict[str, float]:
    """Exact match (%) per task, from an evaluation's per-example records; ``tasks[i]`` is test row i's task."""
    hits: dict[str, list[float]] = {}
    with open(records_dir / "demo.greedy.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            hits.setdefault(tasks[record["index"]], []).append(record["exact_match"])
    return {task: statistics.fmean(values) for task, values in sorted(hits.items())}


def summarise(runs: dict[str, list[tuple[int, Path, Path | None]]], test_file: Path | None = None
              ) -> dict[str, dict]:
    """``{name: {rouge_l, rouge_l_std, exact_match, exact_match_std, eval_ce, seeds, per_seed}}`` over seeds.

    ``eval_ce`` is read from the run folder's metrics; a run given without a folder has none. With ``test_file``
    (rows with a ``task``) every model also gets ``exact_match_by_task``, the seed mean per task.
    """
    from dskd_scale.eval.results import read_results

    tasks = None
    if test_file is not None:
        with open(test_file, encoding="utf-8") as handle:
            tasks = [json.loads(line)["task"] for line in handle]
    summary = {}
    for name, seed_runs in runs.items():
        per_seed = []
        for seed, results_file, run_dir in seed_runs:
            results = read_results(results_file)
            metrics = results["suites"]["demo"]["metrics"]
            per_seed.append({"seed": seed, "rouge_l": metrics["rougeL"], "exact_match": metrics["exact_match"],
                             "eval_ce": held_out_ce(run_dir) if run_dir is not None else None})
            if tasks is not None:
                per_seed[-1]["exact_match_by_task"] = exact_match_by_task(Path(results["records_dir"]), tasks)
        row = {"seeds": [r["seed"] for r in per_seed], "per_seed": per_seed}
        for key in ("rouge_l", "exact_match", "eval_ce"):
            values = [r[key] for r in per_seed if r[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if tasks is not None:  # every seed evaluated the same test rows, so the same tasks
            row["exact_match_by_task"] = {task: statistics.fmean(r["exact_match_by_task"][task] for r in per_seed)
                                          for task in per_seed[0]["exact_match_by_task"]}
        summary[name] = row
    return summary


def print_table(summary: dict[str, dict], test_examples: int) -> None:
    def cell(row: dict, key: str) -> str:
        if row[key] is None:
            return "-"
        return f"{row[key]:.2f} ± {row[f'{key}_std']:.2f}" if len(row["seeds"]) > 1 else f"{row[key]:.2f}"

    header = ["model", "seeds", f"ROUGE-L (test, {test_examples})", "exact match", "held-out CE"]
    rows = [[name, ",".join(map(str, row["seeds"])), cell(row, "rouge_l"), cell(row, "exact_match"),
             cell(row, "eval_ce")] for name, row in summary.items()]
    print_columns(header, rows)
    by_task = {name: row["exact_match_by_task"] for name, row in summary.items() if "exact_match_by_task" in row}
    if by_task:
        tasks = list(next(iter(by_task.values())))
        print("\nexact match by task (seed means)")
        print_columns(["model", *tasks], [[name, *(f"{values.get(task, 0.0):.1f}" for task in tasks)]
                                          for name, values in by_task.items()])


def print_columns(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="everything the demo writes goes here")
    parser.add_argument("--ranks", type=int, default=2, help="training processes of the students (ZeRO-3)")
    parser.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    parser.add_argument("--seeds", default="10,20", help="comma list: one SFT and one DSKD student per seed")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out test examples per model")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing its assets")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"demo.py: error: --out {out}: cannot create it ({err.strerror})", file=sys.stderr)
        return 2
    logs = out / "logs"
    assets = out / "assets"
    started = time.perf_counter()

    if not (assets / "student_train.jsonl").exists():
        run("generate demo data and tokenizers",
            [PYTHON, str(ROOT / "tools" / "make_demo_assets.py"), "--out", str(assets)], logs / "assets.log")
    teacher_tok, student_tok = assets / "teacher_tokenizer", assets / "student_tokenizer"
    prealign(assets / "train.jsonl", teacher_tok, teacher_tok, out / "aligned_teacher", logs)
    prealign(assets / "student_train.jsonl", teacher_tok, student_tok, out / "aligned_student", logs)
    prealign(assets / "valid.jsonl", teacher_tok, student_tok, out / "aligned_valid", logs)

    # Each training run starts from scratch: an earlier demo's checkpoints would otherwise be resumed.
    for run_dir in ("teacher", "student_dskd_eta", "student_sft"):
        shutil.rmtree(out / run_dir, ignore_errors=True)
    run("train the teacher (SFT on the large clean set, one process)",
        train_command(1, args.launcher, CONFIGS / "teacher_sft.yaml", [
            f"output_dir={out / 'teacher'}", f"student.tokenizer={teacher_tok}",
            f"data.train_dir={out / 'aligned_teacher'}", f"optim.max_steps={args.teacher_steps}",
        ]), logs / "train_teacher.log", env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    student_overrides = [
        f"teacher.path={out / 'teacher' / 'export'}", f"student.tokenizer={student_tok}",
        f"data.train_dir={out / 'aligned_student'}", f"data.eval_dir={out / 'aligned_valid'}",
        f"optim.max_steps={args.student_steps}",
    ]
    students = {"student_sft": ["kd.criterion=sft"], "student_dskd_eta": []}
    # Each rank gets its share of the cores. Unset (python tools/demo.py without make's OMP_NUM_THREADS=1), the SFT
    # students ran 3-4 times slower than the distilled ones on this 2-core machine (226 s vs 76 s).
    threads_per_rank = max(1, (os.cpu_count() or 1) // args.ranks)
    for seed in seeds:
        for name, criterion in students.items():
            run_dir = out / name / f"seed{seed}"
            what = "distil the student (dskd_eta)" if name == "student_dskd_eta" else "train the student, SFT only"
            run(f"{what}, seed {seed}",
                train_command(args.ranks, args.launcher, CONFIGS / "student_dskd_eta.yaml", [
                    f"output_dir={run_dir}", f"name=demo_{name}_seed{seed}", f"seed={seed}",
                    f"student.init_seed={seed}", f"data.seed={seed}", *criterion, *student_overrides,
                ]), logs / f"train_{name}_seed{seed}.log", env={"OMP_NUM_THREADS": str(threads_per_rank)})

    test_file = assets / "test.jsonl"
    # The teacher's CE is in its own tokens (and on its own held-out rows): not comparable, so not shown.
    runs = {"teacher": [(10, evaluate("teacher", out / "teacher" / "export", test_file, out, logs, args.eval_limit),
                         None)]}
    for name in students:
        runs[name] = [(seed, evaluate(f"{name}_seed{seed}", out / name / f"seed{seed}" / "export", test_file, out,
                                      logs, args.eval_limit), out / name / f"seed{seed}") for seed in seeds]
    summary = summarise(runs, test_file)
    print(f"\n=== held-out demo test set (greedy decoding; students: mean ± std over seeds {args.seeds}; "
          "students' held-out CE on the clean validation set)")
    print_table(summary, args.eval_limit)
    gain = summary["student_dskd_eta"]["rouge_l"] - summary["student_sft"]["rouge_l"]
    print(f"DSKD-ETA minus SFT: {gain:+.2f} ROUGE-L points (same student, data, steps, batch and learning rate)")
    results_file = out / "results.json"
    results_file.write_text(json.dumps({
        "models": summary,
        "setting": {"teacher_train_examples": "assets/train.jsonl", "student_train": "assets/student_train.jsonl",
                    "test": str(test_file), "eval_limit": args.eval_limit, "student_steps": args.student_steps,
                    "teacher_steps": args.teacher_steps},
    }, indent=2) + "\n", encoding="utf-8")
    print(f"\nComparison: {results_file} (per-model results: {out / 'eval'})")
    print("TensorBoard logs:")
    print(f"  {out / 'teacher' / 'tensorboard'}")
    for name in students:
        for seed in seeds:
            print(f"  {out / name / f'seed{seed}' / 'tensorboard'}")
    print(f"  view with: {Path(PYTHON).parent / 'tensorboard'} --logdir {out}")
    print(f"Exported Hugging Face models: {out / 'teacher' / 'export'}, {out}/student_*/seed*/export")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
