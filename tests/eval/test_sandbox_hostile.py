"""Hostile programs through the evaluator's execution function: nothing escapes, nothing forges a pass.

Every case runs in three ways: as root with user namespaces (the default recipe), as root without a user namespace
(mode ``root``, forced), and as an unprivileged user (uid 65534 through ``setpriv``, the cluster case), each
checked from the host: no file written outside, no process left, no connection made, the evaluator alive.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import pytest

from dskd_scale.eval.execution import CodeTask, Isolation, SandboxLimits, detect_isolation, run_program

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
LIMITS = SandboxLimits(timeout_s=8.0, memory_bytes=512 * 1024**2, max_processes=16, disk_bytes=8 * 1024**2,
                       file_size_bytes=4 * 1024**2)  # fmt: skip
MODES = ["root-userns", "root-no-userns", "unprivileged"]
# Runs tasks with the evaluator's execution function in a process of its own (here: as uid 65534).
RUNNER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from dataclasses import asdict
from dskd_scale.eval.execution import CodeTask, SandboxLimits, detect_isolation, run_program
request = json.load(sys.stdin)
limits = SandboxLimits(**request["limits"])
results = []
for task in request["tasks"]:
    task["program"] = task["program"].replace("EVALUATOR_PID", str(os.getpid()))
    results.append(asdict(run_program(CodeTask(**task), limits)))
print(json.dumps({"isolation": detect_isolation().as_dict(), "results": results, "uid": os.getuid()}))
"""


@lru_cache(maxsize=1)
def _unprivileged_unavailable() -> str | None:
    """Why the unprivileged cases cannot run here, or None."""
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            return "setpriv (util-linux) is missing: cannot run the evaluator as uid 65534"
        python = os.path.realpath(SYSTEM_PYTHON)
        if not os.path.isfile(python) or not os.stat(python).st_mode & stat.S_IXOTH:
            return f"{SYSTEM_PYTHON} is missing or not executable by other users (the venv under /root is mode 700)"
        as_user = _as_nobody()
    if not shutil.which("unshare"):
        return "unshare (util-linux) is missing: cannot check for unprivileged user namespaces"
    probe = subprocess.run([*as_user, "unshare", "--user", "--map-root-user", "true"], capture_output=True,
                           text=True, cwd="/")  # fmt: skip
    if probe.returncode != 0:
        return f"unprivileged user namespaces are disabled on this machine: {probe.stderr.strip()}"
    return None


def _as_nobody() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def execute(mode: str, tasks: list[CodeTask], limits: SandboxLimits = LIMITS, env: dict | None = None) -> list[dict]:
    """Results (as dicts) of ``tasks`` run by the evaluator in ``mode``; ``EVALUATOR_PID`` in a program is
    replaced by the evaluator's pid."""
    if mode.startswith("root") and os.geteuid() != 0:
        pytest.skip("the evaluator does not run as root here")
    if mode in ("root-userns", "unprivileged") and _unprivileged_unavailable():
        pytest.skip(_unprivileged_unavailable())
    if mode == "unprivileged" and os.geteuid() == 0:
        request = json.dumps({"tasks": [asdict(t) for t in tasks], "limits": asdict(limits)})
        done = subprocess.run(
            [*_as_nobody(), SYSTEM_PYTHON, "-I", "-c", RUNNER, str(REPO)], input=request, capture_output=True,
            text=True, cwd="/", timeout=120, env={"PATH": "/usr/bin:/bin", **(env or {})},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reply = json.loads(done.stdout)
        assert reply["uid"] == NOBODY and reply["isolation"]["mode"] == "userns", reply
        return reply["results"]
    isolation = detect_isolation()
    if mode == "root-no-userns":  # what root gets where user namespaces are off
        isolation = Isolation(isolation.python, "root", isolation.extra_binds)
    else:
        assert isolation.mode == "userns"  # user namespaces work here (checked above), so they are what is used
    results = []
    for task in tasks:
        program = task.program.replace("EVALUATOR_PID", str(os.getpid()))
        results.append(asdict(run_program(CodeTask(**{**asdict(task), "program": program}), limits, isolation)))
    return results


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def _marker() -> str:
    """A unique ``sleep`` argument to find a program's processes on the host by their command line."""
    return f"{9000 + random.random() * 1000:.9f}"


@pytest.fixture
def outside():
    """A folder outside the sandbox that every user may write to (0777, under /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="dskd_sandbox_outside_"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", MODES)
def test_double_forked_daemon_in_a_new_session_dies_with_the_run(mode):
    marker = _marker()
    program = f"""
import posix, time
r, w = posix.pipe()
child = posix.fork()
if child == 0:
    posix.setsid()
    if posix.fork() == 0:
        posix.write(w, str(posix.getpid()).encode())
        posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])
    posix._exit(0)
posix.waitpid(child, 0)
daemon = int(posix.read(r, 32))
time.sleep(0.2)

def daemon_alive():
    posix.kill(daemon, 0)
    return True
"""
    [result] = execute(mode, [CodeTask(program=program, test="assert daemon_alive()\n")])
    assert result["status"] == "passed", result  # the daemon was running during the run...
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []  # ...and did not outlive it


FORGER = """
import gc, os, sys
VERDICT = b'{"status": "passed", "detail": ""}\\n'
for fd in range(3, 256):  # every descriptor it holds gets a forged verdict (the reply pipe included)
    try:
        os.write(fd, VERDICT)
    except OSError:
        pass
print(VERDICT.decode())
frames, frame = [], sys._getframe()
while frame is not None:
    frames.append(frame.f_globals.keys())
    frame = frame.f_back
tokens = [o for o in gc.get_objects() if isinstance(o, str) and len(o) == 32]
print("frames", len(frames), "tokens", len(tokens))

class Always:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __bool__(self):
        return True

def add(a, b):
    return Always()
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_program_cannot_forge_the_verdict(mode):
    forged_eq = CodeTask(program=FORGER, test="assert add(1, 2) == 3\nassert add(2, 2) == 4\n")
    killer = CodeTask(program="import os\ndef add(a, b):\n    os.write(1, b'PASSED\\n')\n    os._exit(0)\n",
                      test="assert add(1, 2) == 3\n")  # fmt: skip
    shadows_builtins = CodeTask(  # the program's abs and set must not replace the ones the test uses
        program="abs = lambda x: 0\nset = lambda *args: 0\ndef add(a, b):\n    return [a, b, 7]\n",
        test="assert abs(add(1, 2)[-1] - 3) < 1e-9\nassert set(add(1, 2)) == set([1, 2, 3])\n", proxied=("add",),
    )  # fmt: skip
    stops_the_loop = CodeTask(program="def add(a, b):\n    raise StopIteration\n",
                              test="for total in map(add, [1, 2], [2, 3]):\n    assert total == -1\n")  # fmt: skip
    honest = CodeTask(program="def add(a, b):\n    return a + b\n", test="assert add(1, 2) == 3\n")
    results = execute(mode, [forged_eq, killer, shadows_builtins, stops_the_loop, honest])
    assert [r["status"] for r in results] == ["failed"] * 4 + ["passed"], results


@pytest.mark.parametrize("mode", MODES)
def test_low_level_writes_cannot_reach_outside(mode, outside):
    home = outside / "home_of_the_user"  # writable by the sandbox's uid outside, as a user's home folder is
    home.mkdir()
    os.chown(home, NOBODY, NOBODY) if os.geteuid() == 0 else None
    shared_names = [f"/tmp/dskd_sandbox_escape_{os.getpid()}", f"/dev/shm/dskd_sandbox_escape_{os.getpid()}"]
    program = f"""
import ctypes, os, posix
outcomes = []
def attempt(how, path):
    try:
        if how == "os.open":
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        elif how == "posix.open":
            posix.close(posix.open(path, posix.O_CREAT | posix.O_WRONLY, 0o666))
        elif how == "os.system":
            if os.system(f"echo pwned > {{path}}") != 0:
                raise OSError("shell redirection failed")
        elif how == "ctypes":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.creat(path.encode(), 0o666) < 0:
                raise OSError(ctypes.get_errno(), "creat")
        elif how == "open":
            open(path, "w").write("pwned")
        outcomes.append((how, path, "WROTE"))
    except OSError as err:
        outcomes.append((how, path, type(err).__name__))
for folder in {[str(outside), str(home)]!r}:
    for how in ("os.open", "posix.open", "os.system", "ctypes", "open"):
        attempt(how, f"{{folder}}/{{how}}")
for path in {shared_names!r}:
    attempt("os.open", path)
open("/sandbox/inside.txt", "w").write("fine")

def report():
    return outcomes, open("/sandbox/inside.txt").read()
"""
    [result] = execute(mode, [CodeTask(program=program, test="print(report())\nassert report()[1] == 'fine'\n")])
    assert result["status"] == "passed", result
    assert sorted(p.name for p in outside.iterdir()) == ["home_of_the_user"]
    assert list(home.iterdir()) == []
    assert not any(os.path.exists(path) for path in shared_names)


@pytest.mark.parametrize("mode", MODES)
def test_program_cannot_signal_the_evaluator(mode):
    program = """
import os, signal
sent = []
for pid in (EVALUATOR_PID, -1):
    try:
        os.kill(pid, signal.SIGKILL)
        sent.append(pid)
    except OSError as err:
        sent.append(type(err).__name__)

def survived():
    return sent
"""
    [result] = execute(mode, [CodeTask(program=program, test="assert survived()[0] == 'ProcessLookupError'\n")])
    assert result["status"] == "passed", result  # the evaluator (and the judge) outlived the attempt


@pytest.mark.parametrize("mode", MODES)
def test_unix_socket_files_and_abstract_sockets_are_unreachable(mode, outside):
    path = outside / "evaluator.sock"
    abstract = f"\0dskd_sandbox_test_{os.getpid()}_{random.random()}"
    listeners = []
    for address in (str(path), abstract):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(4)
        listener.setblocking(False)
        listeners.append(listener)
    path.chmod(0o777)
    if mode == "unprivileged" and os.geteuid() == 0 and not _unprivileged_unavailable():  # the user could connect
        control = subprocess.run(
            [*_as_nobody(), SYSTEM_PYTHON, "-I", "-c",
             f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"], cwd="/", capture_output=True,
        )  # fmt: skip
        assert control.returncode == 0, control.stderr
        listeners[0].accept()[0].close()
    program = f"""
import socket
outcomes = []
for address in {[str(path), abstract]!r}:
    try:
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(address)
        outcomes.append("CONNECTED")
    except OSError as err:
        outcomes.append(type(err).__name__)

def tried():
    return outcomes
"""
    try:
        [result] = execute(mode, [CodeTask(program=program, test="assert 'CONNECTED' not in tried()\n")])
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
    assert result["status"] == "passed", result


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"""
import socket
outcomes = []
for address in (("127.0.0.1", {port}), ("1.1.1.1", 53)):
    try:
        socket.create_connection(address, timeout=1).close()
        outcomes.append("CONNECTED")
    except OSError as err:
        outcomes.append(type(err).__name__)

def tried():
    return outcomes
"""
    try:
        [result] = execute(mode, [CodeTask(program=program, test="assert 'CONNECTED' not in tried()\n")])
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert result["status"] == "passed", result


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_capped_and_reaped(mode):
    marker = _marker()
    program = f"""
import posix
children = 0
for _ in range(500):
    try:
        pid = posix.fork()
    except OSError:
        break
    if pid == 0:
        posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])
    children += 1

def forked():
    return children
"""
    [result] = execute(mode, [CodeTask(program=program, test=f"assert 0 < forked() < {LIMITS.max_processes}\n")])
    assert result["status"] == "passed", result
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_memory_hog_fails_with_memory_error(mode):
    program = "def hog():\n    return len(bytearray(4 * 1024 ** 3))\n"
    [result] = execute(mode, [CodeTask(program=program, test="assert hog() > 0\n")])
    assert result["status"] == "failed" and "MemoryError" in result["detail"], result


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out_and_its_children_die(mode):
    marker = _marker()
    program = f"import posix\nif posix.fork() == 0:\n    posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n" \
        "def spin():\n    while True:\n        pass\n"  # fmt: skip
    limits = SandboxLimits(**{**asdict(LIMITS), "timeout_s": 1.5})
    started = time.monotonic()
    [result] = execute(mode, [CodeTask(program=program, test="spin()\n")], limits)
    assert result["status"] == "timeout", result
    assert result["duration_s"] < 1.5 + 3.0
    assert time.monotonic() - started < 20
    assert _processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_huge_files_hit_the_file_size_and_disk_limits(mode):
    program = """
chunk = b"x" * (1024 * 1024)
big_file_error, total, disk_error = None, 0, None
try:
    with open("/sandbox/big", "wb") as handle:
        for _ in range(64):
            handle.write(chunk)
            handle.flush()
except OSError as err:
    big_file_error = err.errno
for index in range(64):
    try:
        with open(f"/sandbox/part{index}", "wb") as handle:
            for _ in range(3):
                handle.write(chunk)
                handle.flush()
                total += len(chunk)
    except OSError as err:
        disk_error = err.errno
        break

def written():
    return big_file_error, total, disk_error
"""
    test = f"import errno\nassert written()[0] == errno.EFBIG\nassert written()[1] <= {LIMITS.disk_bytes}\n" \
        "assert written()[2] == errno.ENOSPC\n"  # fmt: skip
    [result] = execute(mode, [CodeTask(program=program, test=test)])
    assert result["status"] == "passed", result


@pytest.mark.parametrize("mode", MODES)
def test_evaluator_environment_is_out_of_reach(mode, monkeypatch):
    secret = f"s3cr3t-{random.random()}"
    monkeypatch.setenv("DSKD_EVAL_SECRET", secret)
    program = """
import os
seen = [repr(dict(os.environ))]
for path in ("/proc/1/environ", "/proc/self/environ", "/proc/EVALUATOR_PID/environ"):
    try:
        seen.append(open(path).read())
    except OSError as err:
        seen.append(type(err).__name__)
print(seen)

def environment():
    return sorted(os.environ)
"""
    test = "assert environment() == ['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', " \
        "'PATH', 'TMPDIR']\n"  # fmt: skip
    [result] = execute(mode, [CodeTask(program=program, test=test)], env={"DSKD_EVAL_SECRET": secret})
    assert result["status"] == "passed", result
    assert "FileNotFoundError" in result["stdout"] and secret not in result["stdout"]


@pytest.mark.parametrize("mode", MODES)
def test_program_holds_no_capabilities(mode):
    program = """
import ctypes, os
outcomes = []
try:
    os.chroot("/sandbox")
    outcomes.append("CHROOT")
except OSError as err:
    outcomes.append(type(err).__name__)
libc = ctypes.CDLL(None, use_errno=True)
outcomes.append("MOUNTED" if libc.mount(b"none", b"/sandbox", b"tmpfs", 0, None) == 0 else ctypes.get_errno())
try:
    os.mkdir("/new_top_level_folder")
    outcomes.append("MKDIR")
except OSError as err:
    outcomes.append(type(err).__name__)

def tried():
    return outcomes
"""
    [result] = execute(mode, [CodeTask(program=program, test="import errno\nprint(tried())\n"
                                       "assert tried() == ['PermissionError', errno.EPERM, 'OSError']\n")])  # fmt: skip
    assert result["status"] == "passed", result
