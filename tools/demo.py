#!/usr/bin/env python
"""`make demo`: distil a tiny teacher into a tiny student with a different tokenizer, end to end, on CPU.

Every step runs the product's own entry points, the way a user would:

1. generate the demo data and two different tokenizers (`tools/make_demo_assets.py`);
2. prealign it offline (`tools/prealign.py`): once teacher→teacher for the teacher's SFT, once teacher→student;
3. train the teacher with SFT (`launch/train.py`, one process) and export it;
4. distil a smaller student of another architecture with `dskd_eta` (2 ranks, ZeRO-3, the `deepspeed` launcher);
5. train the same student with SFT only, with the same budget (steps, batch, learning rate);
6. evaluate the teacher and both students on held-out data (`tools/evaluate.py`, greedy: exact match, ROUGE-L)
   and print the table (`tools/compare_results.py`) and where the TensorBoard logs are.

    python tools/demo.py --out demo_out [--ranks 2] [--teacher-steps 1500] [--student-steps 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
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


def prealign(out: Path, teacher_tokenizer: Path, student_tokenizer: Path, target: Path, logs: Path) -> None:
    run(f"prealign {teacher_tokenizer.name} -> {student_tokenizer.name}", [
        PYTHON, str(ROOT / "tools" / "prealign.py"), "--teacher-tokenizer", str(teacher_tokenizer),
        "--student-tokenizer", str(student_tokenizer), "--data", str(out / "assets" / "train.jsonl"),
        "--prompt-field", "prompt", "--response-field", "output", "--max-length", "256", "--num-shards", "2",
        "--report-examples", "2", "--out", str(target),
    ], logs / f"prealign_{target.name}.log")


def evaluate(name: str, model: Path, test_file: Path, out: Path, logs: Path, limit: int) -> Path:
    results = out / "eval" / f"{name}.json"
    run(f"evaluate {name}", [
        PYTHON, str(ROOT / "tools" / "evaluate.py"), "--model", str(model), "--suite", "demo",
        "--data-path", f"demo={test_file}", "--greedy", "--max-new-tokens", "48", "--batch-size", "32",
        "--limit", str(limit), "--device", "cpu", "--dtype", "fp32", "--out", str(results),
    ], logs / f"eval_{name}.log")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="everything the demo writes goes here")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (ZeRO-3 data parallel)")
    parser.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out examples per model")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing its assets")
    args = parser.parse_args(argv)

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    assets = out / "assets"
    started = time.perf_counter()

    if not (assets / "student_tokenizer" / "tokenizer.json").exists():
        run("generate demo data and tokenizers",
            [PYTHON, str(ROOT / "tools" / "make_demo_assets.py"), "--out", str(assets)], logs / "assets.log")
    teacher_tok, student_tok = assets / "teacher_tokenizer", assets / "student_tokenizer"
    prealign(out, teacher_tok, teacher_tok, out / "aligned_teacher", logs)
    prealign(out, teacher_tok, student_tok, out / "aligned_distill", logs)

    # Each training run starts from scratch: an earlier demo's checkpoints would otherwise be resumed.
    for run_dir in ("teacher", "student_dskd_eta", "student_sft"):
        shutil.rmtree(out / run_dir, ignore_errors=True)
    run("train the teacher (SFT, one process)", train_command(1, args.launcher, CONFIGS / "teacher_sft.yaml", [
        f"output_dir={out / 'teacher'}", f"student.tokenizer={teacher_tok}",
        f"data.train_dir={out / 'aligned_teacher'}", f"optim.max_steps={args.teacher_steps}",
    ]), logs / "train_teacher.log", env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    student_overrides = [
        f"teacher.path={out / 'teacher' / 'export'}", f"student.tokenizer={student_tok}",
        f"data.train_dir={out / 'aligned_distill'}", f"optim.max_steps={args.student_steps}",
    ]
    run("distil the student (dskd_eta)", train_command(args.ranks, args.launcher, CONFIGS / "student_dskd_eta.yaml", [
        f"output_dir={out / 'student_dskd_eta'}", *student_overrides,
    ]), logs / "train_student_dskd_eta.log")
    run("train the student with SFT only (same budget)",
        train_command(args.ranks, args.launcher, CONFIGS / "student_dskd_eta.yaml", [
            f"output_dir={out / 'student_sft'}", "name=demo_student_sft", "kd.criterion=sft", *student_overrides,
        ]), logs / "train_student_sft.log")

    test_file = assets / "test.jsonl"
    results = [evaluate(name, out / name / "export", test_file, out, logs, args.eval_limit)
               for name in ("teacher", "student_sft", "student_dskd_eta")]
    print("\n=== held-out demo test set (greedy decoding)")
    subprocess.run([PYTHON, str(ROOT / "tools" / "compare_results.py"), *map(str, results)], cwd=ROOT, check=True)
    print("\nTensorBoard logs:")
    for name in ("teacher", "student_sft", "student_dskd_eta"):
        print(f"  {out / name / 'tensorboard'}")
    print(f"  view with: {Path(PYTHON).parent / 'tensorboard'} --logdir {out}")
    exports = ", ".join(str(out / name / "export") for name in ("student_sft", "student_dskd_eta"))
    print(f"Exported Hugging Face models: {exports}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
