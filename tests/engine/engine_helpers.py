"""Helpers for the engine tests: launch ``launch/train.py`` on 1 or 2 CPU ranks (gloo, static ports in 29500-29599)
and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN = PROJECT_ROOT / "launch" / "train.py"
TIMEOUT_S = 240

def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch(config: str, overrides: list[str], *, ranks: int, port: int, extra_args: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node ranks launch/train.py`` (or plain python for one rank); output captured."""
    if ranks == 1:
        command = [sys.executable, str(TRAIN)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(port)]
        command.append(str(TRAIN))
    command += ["--config", str(PROJECT_ROOT / config), *extra_args, *overrides]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def start_rank(config: str, overrides: list[str], *, rank: int, world: int, port: int) -> subprocess.Popen:
    """One rank as its own process (env:// rendezvous), so a test can signal exactly that rank."""
    env = run_env()
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return subprocess.Popen([sys.executable, str(TRAIN), "--config", str(PROJECT_ROOT / config), *overrides],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(output_dir: Path) -> dict[int, dict]:
    """``metrics.jsonl`` rows by step (training rows only)."""
    rows = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


def check(result: subprocess.CompletedProcess, expected: int = 0) -> None:
    assert result.returncode == expected, (
        f"exit {result.returncode} (expected {expected})\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}")


def demo_overrides(demo: dict[str, Path], *, same_vocab: bool, output_dir: Path) -> list[str]:
    teacher = demo["teacher_same"] if same_vocab else demo["teacher"]
    teacher_tok = demo["student_tokenizer"] if same_vocab else demo["teacher_tokenizer"]
    return [f"teacher.path={teacher}", f"teacher.tokenizer={teacher_tok}", "teacher.architecture=",
            f"student.path={demo['student']}", f"student.tokenizer={demo['student_tokenizer']}",
            "student.architecture=", f"data.train_dir={demo['same' if same_vocab else 'eta']}",
            f"output_dir={output_dir}", "log.every_steps=1"]
