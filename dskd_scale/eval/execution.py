"""Sandboxed execution of model-written programs (HumanEval / MBPP pass@1).

Model output never runs in the evaluator's process. Each program runs in a fresh interpreter that:
- starts in its own session (``start_new_session``), and the whole process group is killed on timeout and after exit;
- runs in a fresh temporary folder that is its cwd, HOME and TMPDIR, with a scrubbed environment (no variable of
  the evaluator is passed on);
- has rlimits on address space, CPU seconds, file size, process count and core dumps;
- runs as an unprivileged uid (``nobody``) with no supplementary groups when the evaluator is root;
- has no network: a new, empty network namespace (``unshare -n``, or ``unshare -rn`` when not root) when the
  system allows it;
- is guarded like human-eval's ``reliability_guard`` (see ``sandbox_child.py``) and must print a per-run nonce
  after the program's last statement to count as passed.
Which of the optional layers were available is reported by ``detect_isolation()`` and saved with the results.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")
NOBODY_UID = 65534
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxLimits:
    """Per-program limits. ``output_bytes`` is how much of stdout/stderr is kept for the report."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 16 * 1024**2
    max_processes: int = 64
    output_bytes: int = 4096

    def validate(self) -> list[str]:
        problems = []
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_bytes < 64 * 1024**2:
            problems.append(f"memory_bytes must be >= 64 MiB (the interpreter needs it), got {self.memory_bytes}")
        if self.file_size_bytes <= 0 or self.max_processes <= 0 or self.output_bytes <= 0:
            problems.append("file_size_bytes, max_processes and output_bytes must be > 0")
        return problems


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """``status`` is one of ``passed``, ``failed`` (exception, wrong answer, early exit), ``timeout``."""

    status: str
    detail: str
    stdout: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class Isolation:
    """How programs are started on this machine; ``uid_dropped``/``network_isolated`` say which layers hold."""

    python: str
    command_prefix: tuple[str, ...]
    uid_dropped: bool
    network_isolated: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _other_can_execute(path: str) -> bool:
    """True when a user that is neither owner nor group can run ``path`` (every folder above it searchable)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    parent = os.path.dirname(real)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


def _probe(command: list[str], workdir: str) -> bool:
    try:
        done = subprocess.run(command, cwd=workdir, env=_scrubbed_env(workdir), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@lru_cache(maxsize=4)
def detect_isolation(python: str | None = None, sandbox_uid: int = NOBODY_UID) -> Isolation:
    """Find the strongest start-up recipe that works here (probed once per process).

    Args:
        python: interpreter for sandboxed programs (stdlib only is needed). Default: this interpreter, or, when
            running as root and it is not executable by ``sandbox_uid`` (e.g. it lives under /root), a system
            ``python3`` that is.
        sandbox_uid: the unprivileged uid (and gid) programs run as when the evaluator is root.

    Raises:
        RuntimeError: running as root and no interpreter can be run by ``sandbox_uid`` (name one with ``python``).
    """
    unshare = shutil.which("unshare")
    is_root = os.geteuid() == 0
    candidates = [python] if python else [sys.executable, *_SYSTEM_PYTHONS]
    with tempfile.TemporaryDirectory(prefix="dskd_sandbox_probe_") as workdir:
        if not is_root:
            interpreter = candidates[0]
            prefixes = [(unshare, "-rn", "--")] if unshare else []
            for prefix in prefixes:
                if _probe([*prefix, interpreter, "-I", "-S", "-c", "pass"], workdir):
                    return Isolation(interpreter, prefix, uid_dropped=False, network_isolated=True)
            return Isolation(interpreter, (), uid_dropped=False, network_isolated=False)
        os.chown(workdir, sandbox_uid, sandbox_uid)
        usable = [path for path in candidates if path and _other_can_execute(path)]
        if not usable:
            raise RuntimeError(
                f"no Python interpreter among {candidates} can be executed by uid {sandbox_uid}; sandboxed code "
                "runs as that uid when the evaluator is root. Install a system python3 or pass one readable by "
                "all users (code_execution.python)"
            )
        interpreter = usable[0]
        uid = str(sandbox_uid)
        if unshare:
            prefix = (unshare, "-n", "-S", uid, "-G", uid, "--")
            if _probe([*prefix, interpreter, "-I", "-S", "-c", "pass"], workdir):
                return Isolation(interpreter, prefix, uid_dropped=True, network_isolated=True)
        # No network namespace here: drop the uid through Popen instead (see _start).
        return Isolation(interpreter, (), uid_dropped=True, network_isolated=False)


def _scrubbed_env(workdir: str) -> dict[str, str]:
    # Nothing from the evaluator's environment leaks in (tokens, cluster credentials, paths).
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(
    source: str, limits: SandboxLimits = SandboxLimits(), isolation: Isolation | None = None  # noqa: B008
) -> ExecutionResult:
    """Run one Python program in the sandbox; the program passes if it runs to its end without an exception."""
    isolation = isolation or detect_isolation()
    workdir = tempfile.mkdtemp(prefix="dskd_sandbox_")
    logs = tempfile.mkdtemp(prefix="dskd_sandbox_logs_")  # outside the sandbox folder, owned by the evaluator
    try:
        program = Path(workdir, "program.py")
        program.write_text(source, encoding="utf-8")
        user = {}
        if isolation.uid_dropped:
            os.chown(workdir, NOBODY_UID, NOBODY_UID)
            os.chown(program, NOBODY_UID, NOBODY_UID)
            os.chmod(workdir, 0o700)
            if not isolation.command_prefix:
                user = {"user": NOBODY_UID, "group": NOBODY_UID, "extra_groups": []}
        cpu_seconds = max(1, int(limits.timeout_s + 1))
        command = [
            *isolation.command_prefix, isolation.python, "-I", "-S", "-B", "-c", _CHILD_SOURCE, str(program),
            str(limits.memory_bytes), str(cpu_seconds), str(limits.file_size_bytes), str(limits.max_processes),
        ]  # fmt: skip
        nonce = secrets.token_hex(16)
        stdout_path, stderr_path = Path(logs, "stdout"), Path(logs, "stderr")
        started = time.perf_counter()
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                command, cwd=workdir, env=_scrubbed_env(workdir), stdin=subprocess.PIPE, stdout=stdout,
                stderr=stderr, start_new_session=True, close_fds=True, **user,
            )  # fmt: skip
            try:
                child.stdin.write((nonce + "\n").encode())
                child.stdin.close()
            except BrokenPipeError:
                pass
            timed_out = False
            try:
                child.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(child.pid)  # also reaps anything the program left behind in its group
                child.wait()
        duration = time.perf_counter() - started
        out = _read_capped(stdout_path, limits.output_bytes + 64)
        err = _read_capped(stderr_path, limits.output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    if timed_out:
        return ExecutionResult("timeout", f"killed after {limits.timeout_s:g} s", out, duration)
    lines = out.rstrip("\n").split("\n")
    if child.returncode == 0 and lines[-1] == nonce:
        return ExecutionResult("passed", "", "\n".join(lines[:-1]).rstrip("\n"), duration)
    last_error = err.strip().splitlines()[-1] if err.strip() else ""
    if child.returncode < 0:
        detail = f"killed by signal {signal.Signals(-child.returncode).name} {last_error}".strip()
    elif child.returncode == 0:
        detail = "exited before the end of the program"
    else:
        detail = last_error or f"exit status {child.returncode}"
    return ExecutionResult("failed", detail[:500], out, duration)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), *, workers: int = 2  # noqa: B008
) -> list[ExecutionResult]:
    """Run programs concurrently (each in its own sandbox); results are in the order of ``sources``."""
    isolation = detect_isolation()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda source: run_program(source, limits, isolation), sources))
