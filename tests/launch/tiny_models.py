"""Tiny Hugging Face model folders (tokenizer files + a random model's ``config.json``, no weights) for dry runs.

``launch/train.py --dry-run`` reads a model's ``config.json`` and its tokenizer, never its weights, so a folder
with both is a complete stand-in for a 7B checkpoint there. Built on the demo tokenizers, so the demo data
prealigned with the same tokenizers passes the shards' fingerprint check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_model_folder(tokenizer_dir: Path, out: Path, *, architecture: str, hidden_size: int) -> Path:
    """Copy ``tokenizer_dir`` to ``out`` and add a random ``architecture`` model's config.json sized to it."""
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig

    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=2, n_head=4, n_positions=256,
                            **special)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden_size,
                             max_position_embeddings=256, **special)
    config.save_pretrained(out)
    return out


def run_config_paths(config: Path) -> dict[str, str]:
    """The paths a run config names (dotted key -> value as written)."""
    import yaml

    data = yaml.safe_load(config.read_text())
    keys = {"teacher.path": ("teacher", "path"), "student.path": ("student", "path"),
            "teacher.tokenizer": ("teacher", "tokenizer"), "student.tokenizer": ("student", "tokenizer"),
            "data.train_dir": ("data", "train_dir"), "data.eval_dir": ("data", "eval_dir")}
    found = {}
    for key, (section, name) in keys.items():
        value = (data.get(section) or {}).get(name)
        if value:
            found[key] = value
    return found


def lay_out_run_config(config: Path, workspace: Path, *, teacher: Path, student: Path, data: Path) -> None:
    """Create, under ``workspace``, every model and data path ``config`` names (relative ones) as links to the
    tiny stand-ins, so the config dry-runs unchanged from ``workspace``."""
    targets = {"teacher.path": teacher, "student.path": student, "teacher.tokenizer": teacher,
               "student.tokenizer": student, "data.train_dir": data, "data.eval_dir": data}
    for key, value in run_config_paths(config).items():
        link = workspace / value
        if Path(value).is_absolute() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(targets[key], target_is_directory=True)


@dataclass
class TinyInputs:
    """Demo tokenizers as model folders, demo data as JSON lines, and that data prealigned for the pair."""

    root: Path
    teacher: Path
    student: Path
    train_jsonl: Path
    valid_jsonl: Path
    prealigned: Path


_BUILT: dict[Path, TinyInputs] = {}


def tiny_inputs(tmp_path_factory) -> TinyInputs:
    """Built once per test session (about 15 s): 800 training rows, enough for one global step of every
    configs/runs recipe at 16 ranks after a 500-example hold-out."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        root = tmp_path_factory.mktemp("tiny_inputs")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        assets = root / "assets"
        subprocess.run([sys.executable, str(ROOT / "tools/make_demo_assets.py"), "--out", str(assets), "--train",
                        "800", "--valid", "16", "--test", "4"], env=env, check=True, capture_output=True, timeout=300)
        teacher = make_model_folder(assets / "teacher_tokenizer", root / "models/teacher", architecture="llama",
                                    hidden_size=64)
        student = make_model_folder(assets / "student_tokenizer", root / "models/student", architecture="gpt2",
                                    hidden_size=32)
        prealigned = root / "prealigned"
        done = subprocess.run([sys.executable, str(ROOT / "tools/prealign.py"), "--teacher-tokenizer", str(teacher),
                               "--student-tokenizer", str(student), "--data", str(assets / "train.jsonl"),
                               "--max-length", "128", "--num-shards", "2", "--workers", "1", "--out",
                               str(prealigned)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _BUILT[base] = TinyInputs(root, teacher, student, assets / "train.jsonl", assets / "valid.jsonl", prealigned)
    return _BUILT[base]


def script_cli(script: Path, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``main(argv)`` of an entry-point script (``launch/train.py``, ``tools/*.py``) in this process from ``cwd``:
    (exit status, stdout, stderr).

    In-process so a dozen runs pay the torch/transformers/deepspeed import once, not a dozen times."""
    module = _SCRIPTS.get(script)
    if module is None:
        spec = importlib.util.spec_from_file_location(f"dskd_cli_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[script] = module
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = module.main(argv)
            except SystemExit as exit_:  # argparse: --help, or a usage error
                status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


_SCRIPTS: dict[Path, object] = {}


def train_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``launch/train.py`` in this process (``script_cli``)."""
    return script_cli(ROOT / "launch/train.py", argv, cwd)
