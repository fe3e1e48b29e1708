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


def run_jobs(jobs: list[dict], *, work: Path, ranks: int, port: int) -> tuple[dict, dict]:
    """Several training runs in one torchrun launch (``run_worker.py``): ``(results by job name, probe tensors)``.

    Each job is ``{"name", "config", "overrides", "probe_master"?, "probe_teacher"?}``; metrics rows are keyed by
    step (int).
    """
    import torch

    work.mkdir(parents=True, exist_ok=True)
    jobs_file, result_file = work / "jobs.json", work / "result.json"
    jobs_file.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(Path(__file__).with_name("run_worker.py")),
               str(jobs_file), str(result_file)]
    check(subprocess.run(command, cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S * 2))
    results = json.loads(result_file.read_text())
    for entry in results.values():
        entry["metrics"] = {int(step): row for step, row in entry["metrics"].items()}
    return results, torch.load(result_file.with_suffix(".pt"))


def logits_tolerance(config, logits, dtype=None) -> dict[str, float]:
    """``assert_close`` keywords for two forwards of the same weights that differ only in accumulation order.

    Another thread count or kernel, or LoRA adapters merged into the weights, reorders the sums but not the
    maths. Each logit ends a chain of dot products: per layer the q/k/v projection, the attention over the
    sequence, the output projection (hidden each) and the MLP (hidden, then its inner size), then the head
    (hidden). The accumulated rounding of such a chain is at most ``chain * eps * scale`` (Higham, eq. 4.4), with
    ``scale`` the largest logit magnitude (at least 1: near-zero logits still carry their inputs' rounding).

    Args:
        config: the model's transformers config (GPT-2 or Llama-style names).
        logits: one side of the comparison ``[B, S, V]``.
        dtype: the dtype the forwards ran in (default: ``logits.dtype``).
    """
    import torch

    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    chain = layers * (3 * hidden + logits.shape[1] + inner) + hidden
    bound = chain * torch.finfo(dtype or logits.dtype).eps
    return {"rtol": 0.0, "atol": bound * max(float(logits.abs().max()), 1.0)}


def reference_greedy(model, prompt: list[int], new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding from its definition: one prompt, no padding, no KV cache, argmax of the last logits."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out
