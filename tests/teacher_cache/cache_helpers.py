"""Helpers for the teacher-cache tests: write a cache in-process or with the tool (1 or 2 ranks), read files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOOL = PROJECT_ROOT / "tools" / "cache_teacher.py"
TIMEOUT_S = 240


def write_cache(demo: dict[str, Path], out: Path, *, data: str = "eta", mode: str = "aligned", dtype: str = "bf16",
                batch_size: int = 4, num_shards: int = 3) -> dict:
    """``run_cache_teacher`` in this process (one rank)."""
    from dskd_scale.config.run import ModelConfig
    from dskd_scale.teacher_cache.writer import CacheWriteConfig, run_cache_teacher

    teacher = ModelConfig(path=str(demo["teacher"]), tokenizer=str(demo["teacher_tokenizer"]))
    return run_cache_teacher(CacheWriteConfig(teacher=teacher, data_dir=str(demo[data]), out=str(out), mode=mode,
                                              dtype=dtype, batch_size=batch_size, num_shards=num_shards))


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def tool_command(demo: dict[str, Path], out: Path, *extra: str, ranks: int = 1, port: int = 0,
                 data: str = "eta") -> list[str]:
    """``tools/cache_teacher.py`` under plain python (one rank) or torchrun (``ranks`` ranks, gloo)."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                     "--master_port", str(port)]
    return [*launcher, str(TOOL), "--teacher", str(demo["teacher"]), "--teacher-tokenizer",
            str(demo["teacher_tokenizer"]), "--data", str(demo[data]), "--out", str(out), *extra]


def run_tool(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def check(result: subprocess.CompletedProcess, expected: int = 0) -> None:
    assert result.returncode == expected, (
        f"exit {result.returncode} (expected {expected})\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard file (hidden rows and index) by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.glob("hidden-*.bin"))
            + sorted(folder.glob("index-*.safetensors"))}
