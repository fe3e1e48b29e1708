"""Every command in README.md and launch/README.md runs, so a doc that drifts from the code fails here.

The commands are read from the ```bash blocks. Placeholders (``TEACHER_DIR``, ``/models/...``, ``/data/...``,
``RUN.yaml``) map to tiny stand-ins inside a scratch folder that also links the repository's ``configs/``,
``launch/`` and ``tools/``, so each command runs as written from there. What "runs" means per command:

- ``tools/prealign.py`` and ``tools/alignment_report.py`` (directly or through ``prealign.sbatch``): for real;
- training (``train.py`` under any launcher, ``run_*.sh``, ``train.sbatch``): ``launch/train.py --dry-run`` with
  the command's config and overrides and the world size its launcher flags give; it must pass the pre-flight check;
- other tools (export, evaluate) and commands elided with ``...``: ``--help``, and every flag the doc uses must
  be one the tool knows;
- ``make X``: ``make -n X``; shell scripts that need a real SLURM (``slurm_up.sh``): ``bash -n`` and their flags
  (they run for real in tests/launch/test_slurm_*.py).
A command no rule recognises fails the test: add a rule rather than letting it go unchecked.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import ROOT, lay_out_run_config, script_cli, tiny_inputs, train_cli

DOCS = ("README.md", "launch/README.md")
RUN_PLACEHOLDER = "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"  # what configs/runs/RUN.yaml runs as
MODEL_PLACEHOLDERS = {  # placeholder -> which tiny stand-in; a new placeholder in a doc must be added here
    "TEACHER_DIR": "teacher", "STUDENT_DIR": "student",
    "/models/Qwen2.5-7B": "teacher", "/models/Qwen2.5-Math-7B": "teacher", "/models/Qwen2.5-7B-Instruct": "teacher",
    "/models/Qwen2.5-1.5B": "student", "/models/Llama-3.2-1B": "student",
}
DATA_FILES = {"train.jsonl": "train", "valid.jsonl": "valid", "dolly/train.jsonl": "train",
              "dolly/valid.jsonl": "valid",
              "data/seqkd/train.jsonl": "train"}  # stands in for tools/generate.py output (README, SeqKD)
SHELL_ONLY = {"export", "printf", "mkdir"}  # run as written by bash in the scratch folder (export: no effect)
NEEDS_SLURM_ALLOCATION = ("scontrol show hostnames",)  # only meaningful inside a job; the next line is checked


@dataclass
class Command:
    doc: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands(doc: str) -> list[Command]:
    """The shell commands of the ```bash blocks, continuation lines joined, trailing comments removed."""
    commands, block, pending, start = [], False, "", 0
    for number, raw in enumerate((ROOT / doc).read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            block = line == "```bash"
            continue
        if not block or not line:
            continue
        if not pending:
            start = number
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text = re.sub(r"\s+#.*$", "", pending).strip()
        if text and not text.startswith("#"):
            commands.append(Command(doc, start, re.sub(r"\s+", " ", text)))
        pending = ""
    return commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch 'repository root': links to the code, stand-ins for every placeholder the docs use."""
    tiny = tiny_inputs(tmp_path_factory)
    root = tmp_path_factory.mktemp("docs_workspace")
    for name in ("configs", "launch", "tools", "Makefile", "dskd_scale"):
        (root / name).symlink_to(ROOT / name)
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    for name, split in DATA_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny.train_jsonl if split == "train" else tiny.valid_jsonl, root / name)
    for config in [*sorted((ROOT / "configs/runs").glob("*.yaml")), ROOT / "configs/tests/tiny_dskd_eta.yaml"]:
        lay_out_run_config(config, root, teacher=tiny.teacher, student=tiny.student, data=tiny.prealigned)
    return root, tiny


def _map(token: str, root: Path, tiny) -> str:
    for placeholder, side in sorted(MODEL_PLACEHOLDERS.items(), key=lambda item: -len(item[0])):
        if placeholder in token:
            token = token.replace(placeholder, str(getattr(tiny, side)))
            break
    else:
        unknown = re.search(r"(?<![\w.])/models/[\w.-]+", token)
        assert unknown is None, f"unknown model placeholder {unknown.group(0)}: add it to MODEL_PLACEHOLDERS"
    token = re.sub(r"(?<![\w.])/(data|ckpt)/", lambda m: f"{root}/absolute/{m.group(1)}/", token)
    token = token.replace("configs/runs/RUN.yaml", RUN_PLACEHOLDER)
    return token.replace("$PWD", str(root))


def _env_and_argv(command: Command, root: Path, tiny) -> tuple[dict[str, str], list[str]]:
    tokens = [_map(t, root, tiny) for t in shlex.split(command.text)]
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    return env, tokens


def _run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _script(tokens: list[str], suffixes: tuple[str, ...]) -> int | None:
    return next((i for i, t in enumerate(tokens) if t.endswith(suffixes)), None)


def _option(tokens: list[str], *names: str) -> str | None:
    for i, token in enumerate(tokens):
        for name in names:
            if token == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
    return None


def _world(tokens: list[str], env: dict[str, str], root: Path) -> tuple[int, int]:
    """(ranks, nodes) the command's launcher would start."""
    nodes = int(_option(tokens, "--nodes") or 1)
    per_node = (_option(tokens, "--nproc_per_node", "--num_gpus", "--gpus-per-node", "--ntasks-per-node")
                or env.get("NUM_GPUS"))
    if env.get("NP"):
        return int(env["NP"]), len(env.get("HOSTS", "x").split(","))
    hostfile = env.get("HOSTFILE") or _option(tokens, "--hostfile")
    if hostfile and (root / hostfile).is_file():
        slots = [int(s) for s in re.findall(r"slots=(\d+)", (root / hostfile).read_text())]
        return sum(slots), len(slots)
    return nodes * int(per_node or 1), nodes


def _check_help(tool: str, flags: list[str], root: Path, context: Command) -> None:
    status, out, err = script_cli(ROOT / tool, ["--help"], root)
    assert status == 0, f"{context}\n{err[-2000:]}"
    for flag in flags:
        known = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out)
        assert known, f"{context}\n{tool} --help does not know {flag}"


def _flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


def _dry_run_train(command: Command, env, tokens, root: Path) -> None:
    index = _script(tokens, ("launch/train.py", "run_deepspeed.sh", "run_mpi.sh", "train.sbatch"))
    rest = tokens[index + 1:]
    if rest and rest[0] == "--config":
        config, overrides = rest[1], rest[2:]
    else:
        config, overrides = rest[0], rest[1:]
    overrides = [t for t in overrides if t not in ("--dry-run",)]
    world, nodes = _world(tokens[:index], env, root)
    for flag in ("--world-size", "--nodes"):  # the doc's own, when it gives them
        value = _option(overrides, flag)
        if value is not None:
            position = overrides.index(flag)
            del overrides[position:position + 2]
            world, nodes = (int(value), nodes) if flag == "--world-size" else (world, int(value))
    if world % nodes:
        nodes = 1
    assert (root / config).is_file(), f"{command}\nno config {config}"
    status, out, err = train_cli(["--config", config, "--dry-run", "--world-size", str(world), "--nodes",
                                  str(nodes), *overrides], root)
    assert status == 0, f"{command}\n{err[-3000:]}"
    assert "dry run OK" in out


def check_command(command: Command, root: Path, tiny) -> str:
    """Run ``command`` in its checked form; returns how it was checked."""
    if command.text.startswith(NEEDS_SLURM_ALLOCATION):
        return "needs a SLURM job"
    env, tokens = _env_and_argv(command, root, tiny)
    if tokens[0] in SHELL_ONLY:
        result = _run(["bash", "-c", " ".join(shlex.quote(t) if t != ">" else t for t in tokens)], root)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        return "shell"
    if tokens[0] == "make":
        result = _run(["make", "-n", *tokens[1:]], ROOT)  # prints the recipe, runs nothing
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        return "make -n"
    if _script(tokens, ("launch/local_slurm/slurm_up.sh", "launch/local_slurm/slurm_down.sh")) is not None:
        script = ROOT / tokens[0]
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, str(command)
        for flag in _flags(tokens):
            assert flag in script.read_text(), f"{command}\n{script.name} does not handle {flag}"
        return "bash -n"
    tool = _script(tokens, ("tools/prealign.py", "tools/alignment_report.py", "tools/export.py",
                            "tools/evaluate.py", "tools/compare_results.py", "tools/build_mined_map.py",
                            "tools/cache_teacher.py", "tools/generate.py", "tools/plan_scale.py"))
    prealign_sbatch = _script(tokens, ("launch/slurm/prealign.sbatch",))
    if prealign_sbatch is not None:
        tokens, tool = [sys.executable, "tools/prealign.py", *tokens[prealign_sbatch + 1:]], 1
    if tool is not None:
        script, argv = tokens[tool], tokens[tool + 1:]
        if "..." in argv:
            _check_help(script, [], root, command)
            return "--help"
        if script.endswith(("tools/prealign.py", "tools/alignment_report.py")):
            if script.endswith("prealign.py"):
                argv += ["--workers", "1"]
            status, _, err = script_cli(ROOT / script, argv, root)
            assert status == 0, f"{command}\n{err[-3000:]}"
            return "run"
        _check_help(tokens[tool], _flags(tokens[tool + 1:]), root, command)
        return "--help + flags"
    if _script(tokens, ("launch/train.py", "run_deepspeed.sh", "run_mpi.sh", "train.sbatch")) is not None:
        _dry_run_train(command, env, tokens, root)
        return "dry run"
    pytest.fail(f"{command}\nno rule checks this command: add one to tests/launch/test_documented_commands.py")


def _order(command: Command) -> int:
    """Prealignment first (training dry runs read its output), then everything else in document order."""
    return 0 if re.search(r"(tools/prealign\.py|launch/slurm/prealign\.sbatch)(\s|$)", command.text) else 1


def test_docs_have_commands():
    for doc in DOCS:
        assert len(documented_commands(doc)) >= 5, doc


def test_every_documented_command_runs(workspace):
    root, tiny = workspace
    commands = sorted((c for doc in DOCS for c in documented_commands(doc)), key=_order)
    checked, seconds = {}, {}
    for command in commands:
        start = time.monotonic()
        checked[str(command)] = check_command(command, root, tiny)
        seconds[str(command)] = round(time.monotonic() - start, 1)
    print("\n".join(f"{seconds[c]:6.1f}s {how:16} {c}" for c, how in checked.items()))
    # every kind of check happened at least once (a rule that silently matches nothing would show here)
    assert {"run", "dry run", "--help + flags", "make -n"} <= set(checked.values()), checked


OUTSIDE_REFERENCES = re.compile(r"dskd_anchor|shared/research|aesthetics\.md|feasibility\.md|\.\./shared")
# The one place that may name the optional test-asset folder's default location (it defines DSKD_ASSETS).
ASSET_LOCATOR = "dskd_scale/utils/assets.py"


def test_nothing_points_outside_the_repository():
    """Docs, configs, scripts and library messages/docstrings cite only files a clone has.

    Tests may read the optional assets through DSKD_ASSETS; any other line naming that variable states its
    default and is allowed too."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in listed:
        path = ROOT / name
        if name.startswith("tests/") or name == ASSET_LOCATOR or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{name}:{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
                      if OUTSIDE_REFERENCES.search(line) and "DSKD_ASSETS" not in line]
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)
