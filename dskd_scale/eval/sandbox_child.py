"""The trusted first half of a sandboxed program run; executed as ``python -I -S -B -c <this source>``.

It never runs inside the evaluator: ``dskd_scale.eval.execution`` passes this file's *source* to a fresh interpreter
in its own session. Arguments: ``program_path memory_bytes cpu_seconds file_size_bytes max_processes``; the
first stdin line is a nonce. The child sets its resource limits, reads the nonce, disables destructive functions
(the human-eval ``reliability_guard`` set, plus writes outside the sandbox folder, ``ctypes`` and process
creation), runs the program, and prints the nonce as the last stdout line only if the program ran to its end.
So a program that exits early with status 0 (``os._exit(0)``) is still counted as failed.
"""

import builtins
import os
import resource
import sys


def _set_limits(memory_bytes: int, cpu_seconds: int, file_size_bytes: int, max_processes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_bytes, file_size_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _guard(sandbox_dir: str) -> None:
    import faulthandler
    import io
    import shutil
    import subprocess

    faulthandler.disable()
    real_open = builtins.open

    def confined_open(file, mode="r", *args, **kwargs):
        # Reading is allowed (stdlib, test data); creating or changing files only inside the sandbox folder.
        if any(flag in mode for flag in "wax+") and not isinstance(file, int):
            target = os.path.realpath(os.path.join(sandbox_dir, os.fspath(file)))
            if os.path.commonpath([target, sandbox_dir]) != sandbox_dir:
                raise PermissionError(f"sandbox: writing outside {sandbox_dir} is not allowed: {file}")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = confined_open
    io.open = confined_open
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
        "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
        "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv", "execve", "execvp", "execvpe", "execl",
        "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp",
        "popen", "setsid", "setpgid", "setpgrp", "link", "symlink",
    ):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    for module in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter", "_posixsubprocess"):
        sys.modules[module] = None


def main() -> None:
    program_path = sys.argv[1]
    memory_bytes, cpu_seconds, file_size_bytes, max_processes = (int(value) for value in sys.argv[2:6])
    _set_limits(memory_bytes, cpu_seconds, file_size_bytes, max_processes)
    nonce = sys.stdin.readline().strip()
    with open(program_path, encoding="utf-8") as handle:
        source = handle.read()
    code = compile(source, "program.py", "exec")
    sandbox_dir = os.path.realpath(os.getcwd())
    _guard(sandbox_dir)
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()


main()
