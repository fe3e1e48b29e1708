"""Helpers for the launch tests: the CPU run environment, rendezvous ports, and a handle on the test cluster.

Ports 29600-29699 belong to this test folder: 29600-29602 SLURM daemons, 29640-29669 srun, and
rendezvous ports handed out by ``free_port`` from 29610-29639.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PORT_BASE = 29600
SLURM_UNAVAILABLE = 3  # slurm_up.sh: slurm-wlm missing and not installable
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE"}
_rendezvous_ports = iter(range(PORT_BASE + 10, PORT_BASE + 40))


def free_port() -> int:
    """A rendezvous port from this folder's range, never the same twice in one session."""
    return next(_rendezvous_ports)


def run_env(**extra: str) -> dict[str, str]:
    """The CPU environment every launched process gets (plus ``extra``)."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHON=str(VENV_PYTHON), PATH=f"{VENV_PYTHON.parent}:{env.get('PATH', '')}")
    env.update(extra)
    return env


@dataclass
class SlurmCluster:
    """Handle on the running test cluster; every command gets this cluster's SLURM_CONF."""

    directory: Path
    env: dict[str, str] = field(default_factory=dict)

    def submit(self, script: Path, *args: str, sbatch_options: tuple[str, ...] = (), **env: str) -> str:
        result = subprocess.run(["sbatch", "--parsable", *sbatch_options, str(script), *args], cwd=ROOT,
                                env={**self.env, **env}, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env=self.env,
                                capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    def wait(self, job_id: str, log: Path, timeout: float) -> str:
        """Wait until the job reaches a final state; on timeout cancel it and fail showing its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.5)
        self.signal(job_id, "KILL", batch_only=False)
        pytest.fail(f"job {job_id} not finished after {timeout:.0f} s (state {self.state(job_id)}); log:\n"
                    f"{read_log(log)}")

    def wait_for_line(self, job_id: str, log: Path, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in read_log(log):
                return
            if self.state(job_id) in TERMINAL_STATES:
                break
            time.sleep(0.3)
        pytest.fail(f"'{text}' never appeared in {log} (job {job_id} {self.state(job_id)}):\n{read_log(log)}")

    def signal(self, job_id: str, signal: str, *, batch_only: bool) -> None:
        scope = ["--batch"] if batch_only else ["--full"]
        subprocess.run(["scancel", f"--signal={signal}", *scope, job_id], env=self.env, check=True, timeout=30)


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} does not exist>"


TINY_CONFIG = ROOT / "configs" / "tests" / "tiny_dskd_eta.yaml"


@dataclass(frozen=True)
class DemoData:
    """Generated demo tokenizers + jsonl and their single-process prealignment (the training data)."""

    assets: Path
    prealigned: Path
    prealign_args: tuple[str, ...]


def train_overrides(demo: DemoData, output_dir: Path, *, steps: int) -> list[str]:
    """Dotted overrides that point the tiny CPU config at the demo data; a loss line every step, no export."""
    return [f"output_dir={output_dir}", f"teacher.tokenizer={demo.assets / 'teacher_tokenizer'}",
            f"student.tokenizer={demo.assets / 'student_tokenizer'}", f"data.train_dir={demo.prealigned}",
            f"optim.max_steps={steps}", "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false",
            "checkpoint.every_steps=0", "checkpoint.export_at_end=false"]


def logged_losses(log_text: str) -> dict[int, str]:
    """step -> ``train/loss`` from launch/train.py's rank-0 log; a step logged twice must agree."""
    seen: dict[int, str] = {}
    for step, loss in re.findall(r"dskd_scale\.loop: step (\d+) .*?train/loss=(\S+)", log_text):
        assert seen.setdefault(int(step), loss) == loss, f"step {step} logged twice with different losses"
    return seen
