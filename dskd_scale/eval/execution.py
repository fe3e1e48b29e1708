"""Sandboxed execution of model-written programs (HumanEval / MBPP pass@1), contained from outside the program.

A run is three processes, none of them the evaluator:
- the **worker** (``sandbox_child.py``) hosts the untrusted program. It runs as PID 1 of new PID, mount, network,
  IPC and UTS namespaces, inside a user namespace whose root is an unprivileged uid outside (``nobody`` when the
  evaluator is root, the evaluator's own uid otherwise), with no capabilities and ``no_new_privs``. Its file system
  is a fresh root of read-only bind mounts (``/usr``, ``/lib*``, the interpreter's prefix), five ``/dev`` nodes and
  ``/sandbox``, a size-limited tmpfs that is the only writable place: host files, ``/proc``, ``/tmp``, ``/run``,
  ``/home`` and unix socket files do not exist there, and the network namespace has no interface but a down
  loopback. Limits: rlimits on address space, CPU seconds, file size and processes (per process; a fork bomb is also
  bounded by the process limit), and the wall-clock ``timeout_s``. When the run ends, the supervisor outside the
  namespace SIGKILLs PID 1 and the kernel kills everything left in the namespace (daemons, double forks, new
  sessions). The environment is scrubbed: no variable of the evaluator is passed on.
- the **judge** (``sandbox_judge.py``, trusted, outside the sandbox) runs the dataset's tests (``check(candidate)``,
  MBPP asserts) and the dataset's prompt helpers. The program's functions are proxies there: arguments and results
  cross a pair of pipes as plain data (``sandbox_wire.py``, never pickle), exceptions as builtin type names. The
  verdict is the judge's stdout, a pipe only the evaluator holds: the program can neither print it, nor reach the
  judge's objects (it has none of the program's), nor signal the judge or the evaluator (other PID namespace).
- the **supervisor**, the launcher's parent half outside the PID namespace (see ``sandbox_child.py``).

``detect_isolation()`` probes once per process which mode works: ``userns`` (unprivileged user namespaces: works
as root and as an ordinary user), ``root`` (the evaluator is root but user namespaces are off: the same namespaces
without a user namespace, dropping to ``nobody`` before the program runs), else none. With none it refuses
(``SandboxUnavailable``) unless ``allow_unsandboxed=True`` (``code_execution.allow_unsandboxed`` /
``--allow-unsandboxed-execution``): then the worker runs with rlimits, a scrubbed environment, its own session and
``nobody``'s uid when root, killed by process group, and generated code can read and write whatever that uid can.
The verdict stays unforgeable in every mode. Which mode ran is saved with the results. Linux on x86_64,
aarch64 or ppc64le.

Limits of this design, stated plainly: namespaces share the host kernel (a kernel exploit escapes; this is not a
VM). Memory and CPU limits are rlimits per process, not a cgroup: up to ``max_processes`` processes can each use
``memory_bytes`` and spin until ``timeout_s``. The program can read the host's ``/usr`` and ``/lib*`` (read-only).
The judge runs as the evaluator's user. Differences from running program and tests in one interpreter: arguments
reach the program as copies (a test reading back an argument mutated in place would see the original), and
values of types that are not plain data are ``Opaque`` (truth value and repr only). All 164 HumanEval and all 427
sanitized MBPP canonical solutions pass this way (``tests/eval/test_execution.py`` runs all of HumanEval and a
part of MBPP).
"""

from __future__ import annotations

import json
import os
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

_HERE = Path(__file__).parent
_WIRE_SOURCE = (_HERE / "sandbox_wire.py").read_text(encoding="utf-8")
_WORKER_SOURCE = _WIRE_SOURCE + (_HERE / "sandbox_child.py").read_text(encoding="utf-8")
_JUDGE_SOURCE = _WIRE_SOURCE + (_HERE / "sandbox_judge.py").read_text(encoding="utf-8")
NOBODY_UID = 65534
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/libx32/")
_MODES = ("userns", "root", "none")


class SandboxUnavailable(RuntimeError):
    """Generated code cannot be contained on this machine (and running it uncontained was not allowed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxLimits:
    """Per-run limits. ``output_bytes`` is how much of the program's stdout/stderr is kept for the report;
    ``disk_bytes`` is the size of the writable ``/sandbox`` tmpfs (it counts towards memory, not disk)."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 16 * 1024**2
    disk_bytes: int = 64 * 1024**2
    max_processes: int = 64
    output_bytes: int = 4096

    def validate(self) -> list[str]:
        problems = []
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_bytes < 64 * 1024**2:
            problems.append(f"memory_bytes must be >= 64 MiB (the interpreter needs it), got {self.memory_bytes}")
        if min(self.file_size_bytes, self.disk_bytes, self.max_processes, self.output_bytes) <= 0:
            problems.append("file_size_bytes, disk_bytes, max_processes and output_bytes must be > 0")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeTask:
    """One program and its tests. ``program`` is untrusted (model output, run in the sandbox); ``setup`` and
    ``test`` are trusted dataset code run by the judge; ``proxied`` names program functions the test reaches
    indirectly (HumanEval's entry point, which the setup defines as a stub). See ``sandbox_tasks``."""

    program: str
    test: str
    setup: str = ""
    proxied: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """``status`` is one of ``passed``, ``failed`` (exception, wrong answer, program died), ``timeout``."""

    status: str
    detail: str
    stdout: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class Isolation:
    """How programs are contained here: ``mode`` is ``userns``, ``root`` or ``none`` (see the module docstring)."""

    python: str
    mode: str
    extra_binds: tuple[str, ...] = ()

    @property
    def contained(self) -> bool:
        return self.mode != "none"

    def as_dict(self) -> dict:
        return {**asdict(self), "contained": self.contained,
                "namespaces": "user+pid+mount+net+ipc+uts" if self.mode == "userns" else
                              "pid+mount+net+ipc+uts" if self.mode == "root" else "none"}  # fmt: skip


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


def _extra_binds(python: str) -> tuple[str, ...]:
    """The interpreter's prefix, when it lives outside the system folders the sandbox always mounts."""
    done = subprocess.run(
        [python, "-I", "-S", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
        capture_output=True, text=True, timeout=60, env=_scrubbed_env("/"), check=True,
    )  # fmt: skip
    paths = {os.path.realpath(p) for p in done.stdout.split()} | {os.path.dirname(os.path.realpath(python))}
    outside = sorted(p for p in paths if not (p + "/").startswith(_SYSTEM_DIRS))
    return tuple(p for p in outside if not any(p != q and p.startswith(q + "/") for q in outside))


_PROBE = CodeTask(program="def twice(x):\n    return 2 * x\n", test="assert twice(21) == 42\n")


@lru_cache(maxsize=8)
def detect_isolation(python: str | None = None, allow_unsandboxed: bool = False) -> Isolation:
    """The strongest mode that works here, probed with a real run (once per process and arguments).

    Args:
        python: interpreter for the worker and judge (stdlib only). Default: this interpreter, or, when running as
            root and it is not executable by ``nobody`` (e.g. it lives under /root), a system ``python3`` that is.
        allow_unsandboxed: where no namespace mode works, run generated code without containment instead of
            raising.

    Raises:
        SandboxUnavailable: no mode contains programs here and ``allow_unsandboxed`` is false, or (root) no
            interpreter can be executed by ``nobody``.
    """
    is_root = os.geteuid() == 0
    candidates = [python] if python else [sys.executable, *_SYSTEM_PYTHONS]
    if is_root:  # the launcher runs as nobody, so it must be able to execute the interpreter
        usable = [path for path in candidates if path and _other_can_execute(path)]
        if not usable:
            raise SandboxUnavailable(
                f"no Python interpreter among {candidates} can be executed by uid {NOBODY_UID}; sandboxed code runs "
                "as that uid when the evaluator is root. Install a system python3 or pass one readable by all users "
                "(code_execution.python)"
            )
        interpreter = os.path.realpath(usable[0])
    else:
        interpreter = os.path.realpath(candidates[0])
    binds = _extra_binds(interpreter)
    failures = []
    for mode in ("userns", "root") if is_root else ("userns",):
        isolation = Isolation(interpreter, mode, binds)
        result = _run(_PROBE, SandboxLimits(timeout_s=30.0), isolation)
        if result.passed:
            return isolation
        failures.append(f"{mode}: {result.detail}")
    if allow_unsandboxed:
        return Isolation(interpreter, "none", ())
    raise SandboxUnavailable(
        "cannot contain generated code on this machine: " + "; ".join(failures) + ". The sandbox needs "
        "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0, "
        "not blocked by seccomp or AppArmor) or root with CAP_SYS_ADMIN. To run model-written code WITHOUT "
        "containment (it can then read and write everything this user can), set code_execution.allow_unsandboxed "
        "(tools/evaluate.py --allow-unsandboxed-execution)"
    )


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


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def _describe_status(status: int | None) -> str:
    if status is None:
        return ""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _launch_worker(isolation: Isolation, limits: SandboxLimits, root_dir: str, fds: dict[str, int]):
    cpu_seconds = max(1, int(limits.timeout_s + 1))
    config = {
        "mode": isolation.mode, "root": root_dir, "extra_binds": list(isolation.extra_binds),
        "python": isolation.python, "worker_source": _WORKER_SOURCE, "disk_bytes": limits.disk_bytes,
        "limits": {"memory_bytes": limits.memory_bytes, "cpu_seconds": cpu_seconds,
                   "file_size_bytes": limits.file_size_bytes, "max_processes": limits.max_processes},
        **fds,
    }  # fmt: skip
    as_nobody = {}
    if os.geteuid() == 0 and isolation.mode in ("userns", "none"):
        as_nobody = {"user": NOBODY_UID, "group": NOBODY_UID, "extra_groups": []}
    return subprocess.Popen(
        [isolation.python, "-I", "-S", "-B", "-c", _WORKER_SOURCE, "launch", json.dumps(config)],
        cwd=root_dir, env=_scrubbed_env(root_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=fds["stderr_fd"], start_new_session=True, pass_fds=tuple(fds.values()), **as_nobody,
    )  # fmt: skip


def _stop_worker(launcher: subprocess.Popen, isolation: Isolation) -> int | None:
    """End the run's namespace (the supervisor kills PID 1); returns PID 1's wait status when known."""
    if isolation.mode == "none":
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        launcher.wait()
        return launcher.returncode
    try:
        out, _ = launcher.communicate(timeout=10)  # closes stdin: the supervisor kills PID 1 and reports
    except subprocess.TimeoutExpired:
        launcher.kill()  # PID 1 still dies: its parent-death signal is SIGKILL
        launcher.communicate()
        return None
    try:
        return json.loads(out)["status"]
    except (ValueError, KeyError, TypeError):
        return None


def _run(task: CodeTask, limits: SandboxLimits, isolation: Isolation) -> ExecutionResult:
    logs = tempfile.mkdtemp(prefix="dskd_sandbox_logs_")  # the evaluator's alone (0700), never mounted in
    root_dir = tempfile.mkdtemp(prefix="dskd_sandbox_root_")  # an empty mount point (or the cwd in mode none)
    os.chmod(root_dir, 0o755 if isolation.contained else 0o700)
    if os.geteuid() == 0 and not isolation.contained:
        os.chown(root_dir, NOBODY_UID, NOBODY_UID)
    pipes = []
    try:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        pipes = [request_r, request_w, reply_r, reply_w]
        with open(Path(logs, "stdout"), "wb") as stdout, open(Path(logs, "stderr"), "wb") as stderr, \
                open(Path(logs, "judge"), "wb") as judge_err:  # fmt: skip
            started = time.perf_counter()
            fds = {"request_fd": request_r, "reply_fd": reply_w, "stdout_fd": stdout.fileno(),
                   "stderr_fd": stderr.fileno()}  # fmt: skip
            launcher = _launch_worker(isolation, limits, root_dir, fds)
            try:
                judge = subprocess.Popen(
                    [isolation.python, "-I", "-S", "-B", "-c", _JUDGE_SOURCE, str(request_w), str(reply_r),
                     str(max(limits.memory_bytes, 1024**3))],
                    env=_scrubbed_env(logs), cwd=logs, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=judge_err, start_new_session=True, pass_fds=(request_w, reply_r),
                )  # fmt: skip
            except BaseException:
                _stop_worker(launcher, isolation)
                raise
            for fd in pipes:
                os.close(fd)
            pipes = []
            timed_out = False
            try:
                verdict_text, _ = judge.communicate(json.dumps(asdict(task)).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                judge.kill()
                verdict_text, _ = judge.communicate()
            finally:
                worker_status = _stop_worker(launcher, isolation)
            duration = time.perf_counter() - started
        out = _read_capped(Path(logs, "stdout"), limits.output_bytes)
        err = _read_capped(Path(logs, "stderr"), 1 << 20)
        judge_log = _read_capped(Path(logs, "judge"), 1 << 20)
    finally:
        for fd in pipes:
            os.close(fd)
        shutil.rmtree(logs, ignore_errors=True)
        os.rmdir(root_dir) if isolation.contained else shutil.rmtree(root_dir, ignore_errors=True)
    if timed_out:
        return ExecutionResult("timeout", f"killed after {limits.timeout_s:g} s", out, duration)
    try:
        verdict = json.loads(verdict_text)
    except ValueError:
        detail = f"the judge exited with status {judge.returncode} without a verdict: {_last_line(judge_log)}"
        return ExecutionResult("failed", detail[:500], out, duration)
    if verdict["status"] == "error":
        detail = f"{verdict['detail']} (mode {isolation.mode}): {_last_line(err)}"
        return ExecutionResult("error", detail[:2000], out, duration)
    detail = verdict["detail"]
    if verdict["status"] != "passed" and detail.startswith("the program's process exited"):
        detail = f"{detail}: {_describe_status(worker_status)} {_last_line(err)}".strip()
    return ExecutionResult(verdict["status"], detail[:500], out, duration)


def run_program(
    task: CodeTask,
    limits: SandboxLimits = SandboxLimits(),
    isolation: Isolation | None = None,  # noqa: B008
) -> ExecutionResult:
    """Run one program in the sandbox and its tests in the judge; it passes if every test passes.

    Raises:
        SandboxUnavailable: the sandbox cannot be used here (see ``detect_isolation``) or failed to start.
    """
    isolation = isolation or detect_isolation()
    result = _run(task, limits, isolation)
    if result.status == "error":  # never count a broken sandbox as a failed program
        raise SandboxUnavailable(f"the code sandbox failed to start: {result.detail}")
    return result


def run_programs(
    tasks: Sequence[CodeTask], limits: SandboxLimits = SandboxLimits(), *, workers: int = 2,  # noqa: B008
    isolation: Isolation | None = None,
) -> list[ExecutionResult]:  # fmt: skip
    """Run tasks concurrently (each in its own sandbox); results are in the order of ``tasks``."""
    isolation = isolation or detect_isolation()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda task: run_program(task, limits, isolation), tasks))
