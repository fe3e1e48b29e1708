"""The sandbox side of a code run: the namespace launcher (trusted) and the worker that hosts the program.

Runs as ``python -I -S -B -c <sandbox_wire source + this source> launch <config json>``, started by
``dskd_scale.eval.execution`` with a scrubbed environment, in its own session, as an unprivileged uid (``nobody``
when the evaluator is root, the evaluator's own uid otherwise; as root in mode ``root``, which drops in step 4).
Mode ``none`` (explicitly allowed uncontained runs) only does step 4 in a host folder. Nothing here imports the
package.

``launch`` (mode ``userns``, the default everywhere it works):
1. ``unshare`` a new user namespace (the launcher's uid becomes 0 inside, still the same unprivileged uid outside),
   and new mount, PID, network, IPC and UTS namespaces. Mode ``root`` (evaluator is root, user namespaces are
   off) skips the user namespace and drops to ``nobody`` in step 4 instead.
2. ``fork``: the child is PID 1 of the new PID namespace. The parent stays outside as the supervisor: it waits until
   the evaluator closes its stdin (run finished, timed out, or the evaluator died), then SIGKILLs PID 1, which
   makes the kernel kill every process of the namespace (daemons, double forks, new sessions: all of them), reaps
   it and prints its exit status. The program cannot see or signal the supervisor, the judge or the evaluator.
3. PID 1 builds a fresh root on a small tmpfs: read-only bind mounts of ``/usr``, ``/lib*``, ``/bin``, ``/sbin``
   (symlinks where the host has symlinks) and the interpreter's prefix; ``/dev`` with only null, zero, full, random,
   urandom; ``/sandbox``, a size-limited tmpfs that is the only writable place, the cwd, HOME and TMPDIR. No
   ``/proc``, ``/sys``, ``/etc``, ``/tmp``, ``/run``, ``/home``, ``/var``, ``/root`` of the host: their files and
   unix sockets do not exist in the sandbox. ``pivot_root`` into it, detach the old root, remount ``/`` read-only.
4. Set rlimits (address space, CPU seconds, file size, processes, no core dumps), drop every capability from the
   bounding, inheritable and ambient sets, set ``no_new_privs`` and exec ``python ... serve``.

``serve`` (untrusted from the moment the program's first statement runs): receives the program over its request
pipe, runs it, then answers calls ``(name, args, kwargs)`` with the result as plain data or an exception type
name. It never sees the tests, and it holds no channel to the evaluator except its own stdout/stderr files.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

if "receive" not in globals():  # at run time execution.py prepends sandbox_wire's source instead
    from dskd_scale.eval.sandbox_wire import decode, encode, receive, send

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)  # fmt: skip
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_RELATIME = 4096
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 38, 47, 4
# (pivot_root, capset) syscall numbers; another architecture fails at setup, so detect_isolation refuses it
SYS_PIVOT_ROOT, SYS_CAPSET = {"x86_64": (155, 126), "aarch64": (41, 91), "ppc64le": (203, 184)}.get(
    os.uname().machine, (-1, -1)
)
DEVICES = ("null", "zero", "full", "random", "urandom")
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(
            None if source is None else source.encode(), target.encode(), None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags), None if data is None else data.encode(),
        ),
        f"mount {source} on {target}",
    )  # fmt: skip


def _bind_readonly(source, target):
    """Bind ``source`` at ``target`` and make it read-only, keeping the flags the kernel locks in a namespace."""
    _mount(source, target, None, MS_BIND | MS_REC)
    host = os.statvfs(source).f_flag
    kept = host & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    kept |= MS_RELATIME if host & ST_RELATIME else 0
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def _build_root(config):
    root = config["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for name in SYSTEM_DIRS:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, name))
        elif os.path.isdir(host):
            os.mkdir(os.path.join(root, name))
            _bind_readonly(host, os.path.join(root, name))
    for host in config["extra_binds"]:  # the interpreter's prefix when it lives outside the system folders
        target = root + host
        if not os.path.exists(target):
            os.makedirs(target)
            _bind_readonly(host, target)
    os.mkdir(os.path.join(root, "dev"))
    for name in DEVICES:
        target = os.path.join(root, "dev", name)
        open(target, "w").close()
        _mount("/dev/" + name, target, None, MS_BIND)
    os.mkdir(os.path.join(root, "sandbox"))
    owner = "" if config["mode"] == "userns" else f",uid={NOBODY},gid={NOBODY}"
    _mount("tmpfs", os.path.join(root, "sandbox"), "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={config['disk_bytes']},nr_inodes=10000,mode=0700{owner}")  # fmt: skip
    os.mkdir(os.path.join(root, ".old_root"))
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), os.path.join(root, ".old_root").encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old_root", MNT_DETACH), "umount old root")
    os.rmdir("/.old_root")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/sandbox")


def _set_limits(limits):
    memory = limits["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"], limits["file_size_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def _drop_privileges(config):
    if config["mode"] == "root":  # no user namespace: become nobody (this clears the permitted capabilities)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    cap = 0
    while config["mode"] != "none" and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    header, data = _CapHeader(0x20080522, 0), (ctypes.c_uint32 * 6)()  # v3: effective/permitted/inheritable x2
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _arrange_fds(config):
    """stdin from /dev/null, stdout/stderr to the evaluator's capture files, the two judge pipes; nothing else."""
    null = os.open("/dev/null", os.O_RDONLY)
    for target, source in ((0, null), (1, config["stdout_fd"]), (2, config["stderr_fd"])):
        os.dup2(source, target)
    keep = sorted({0, 1, 2, config["request_fd"], config["reply_fd"]})
    for low, high in zip(keep, [*keep[1:], 65536], strict=True):
        os.closerange(low + 1, high)


def launch(config):
    if config["mode"] == "none":  # explicitly allowed uncontained run: limits, fds and exec only
        os.chdir(config["root"])
        _exec_worker(config, home=config["root"])
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if config["mode"] == "userns":
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare")
    if config["mode"] == "userns":
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    pid = os.fork()
    if pid:
        for name in ("request_fd", "reply_fd", "stdout_fd"):  # PID 1 alone holds them: its death closes them
            os.close(config[name])
        supervise(pid)
        return
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        _build_root(config)
    except BaseException:
        _setup_failed()
    _exec_worker(config, home="/sandbox")


def _setup_failed():
    traceback.print_exc()
    sys.stderr.write("sandbox setup failed\n")
    sys.stderr.flush()
    os._exit(125)


def _exec_worker(config, home):
    try:
        _set_limits(config["limits"])
        _drop_privileges(config)
        _arrange_fds(config)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        python = config["python"]
        os.execve(python, [python, "-I", "-S", "-B", "-c", config["worker_source"], "serve",
                           str(config["request_fd"]), str(config["reply_fd"])], env)  # fmt: skip
    except BaseException:
        _setup_failed()


def supervise(pid):
    """Outside the PID namespace: hold PID 1 until the evaluator lets go of stdin, then kill the namespace."""
    while os.read(0, 4096):
        pass
    try:
        os.kill(pid, signal.SIGKILL)  # PID 1 is our unreaped child: the pid cannot have been reused
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(json.dumps({"status": status}) + "\n")
    sys.stdout.flush()


def _exception_reply(err):
    return {"raise": [type(err).__name__, str(err)[:500]]}


def _describe(namespace, name):
    """What the judge should bind for a name its test reads: a proxy, a module to import itself, or a value."""
    if name not in namespace:
        return ["missing"]
    value = namespace[name]
    if type(value) is type(sys):
        return ["module", str(value.__name__)]
    if callable(value):
        return ["callable"]
    return ["value", encode(value, opaque=True)]


def serve(request_fd, reply_fd):
    """Load the program, then answer calls until the judge hangs up. Untrusted once the program runs."""
    send(reply_fd, {"hello": True})
    load = receive(request_fd)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(load["program"], "program.py", "exec"), namespace)
        names = {name: _describe(namespace, name) for name in load["describe"]}
        sys.stdout.flush()
        send(reply_fd, {"loaded": True, "names": names})
    except BaseException as err:  # noqa: BLE001 - any failure of the program is reported, SystemExit included
        send(reply_fd, _exception_reply(err))
        return
    while True:
        try:
            call = receive(request_fd)
        except EOFError:
            return
        try:
            name = call["name"]
            if name not in namespace:
                raise NameError(f"name '{name}' is not defined")
            args = decode(call["args"])
            kwargs = decode(call["kwargs"])
            reply = {"value": encode(namespace[name](*args, **kwargs), opaque=True)}
        except BaseException as err:  # noqa: BLE001
            reply = _exception_reply(err)
        sys.stdout.flush()
        send(reply_fd, reply)


def main():
    if sys.argv[1] == "launch":
        launch(json.loads(sys.argv[2]))
    else:
        serve(int(sys.argv[2]), int(sys.argv[3]))


main()
