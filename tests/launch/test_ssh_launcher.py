"""launch/run_deepspeed.sh in its multi-node form: HOSTFILE with two host names, ranks started over ssh by pdsh.

A private sshd (own host key, own authorized key, port 29670 on 127.0.0.1, started and always stopped by the
fixture; the machine's own sshd and ssh configuration are not touched) stands in for the nodes. The two "nodes"
are the host names ``localhost`` and ``127.0.0.1``. ``ssh`` on PATH is a wrapper that adds ``-F <our client
config>`` (key, no host-key prompts), the way a user's ``~/.ssh/config`` would; the port comes from the
script's SSH_PORT. Environment variables reach the remote ranks through a ``.deepspeed_env`` file (here named by
DeepSpeed's DS_ENV_FILE, so nothing is written into the repository or the home folder).
Skips with the reason when sshd/pdsh are not installed (``.ci/run`` installs openssh-server and pdsh) or the
tests do not run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch_support import ROOT, TINY_CONFIG, DemoData, free_port, logged_losses, run_env, train_overrides

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

SSH_PORT = 29670
SSHD = Path("/usr/sbin/sshd")
STEPS = 3


@dataclass(frozen=True)
class LocalSsh:
    port: int
    bin_dir: Path  # holds the `ssh` wrapper; put it first on PATH
    log: Path  # sshd's own log (-E)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the private sshd logs the test in as the launching user with StrictModes off"
    if not SSHD.is_file():
        return f"{SSHD} not installed (apt-get install openssh-server; .ci/run does)"
    for tool in ("pdsh", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed (apt-get install pdsh openssh-server; .ci/run does)"
    return None


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sshd exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"sshd did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{log.read_text(errors='replace')}")


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (sshd's per-connection processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def local_ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSsh]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("sshd")
    for key in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True,
                       timeout=30)
    shutil.copy(directory / "id_ed25519.pub", directory / "authorized_keys")
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {SSH_PORT}", "ListenAddress 127.0.0.1", f"HostKey {directory / 'host_ed25519'}",
        f"PidFile {directory / 'sshd.pid'}", f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "LogLevel INFO", ""]))
    (directory / "ssh_config").write_text("\n".join([
        "Host *", f"  IdentityFile {directory / 'id_ed25519'}", "  IdentitiesOnly yes", "  BatchMode yes",
        "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  AddressFamily inet",
        ""]))
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {directory / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = directory / "sshd.log"
    sshd = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        _wait_for_port(SSH_PORT, sshd, log)
        yield LocalSsh(SSH_PORT, bin_dir, log)
    finally:
        for child in _children(sshd.pid):  # sessions still open after a failure
            os.kill(child, signal.SIGKILL)
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait(timeout=10)
        assert sshd.returncode is not None and not _children(sshd.pid), "sshd or its sessions still running"


def test_run_deepspeed_pdsh_over_ssh_two_nodes(local_ssh: LocalSsh, demo_data: DemoData, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two host names for this machine: two nodes of one slot each\nlocalhost slots=1\n"
                        "127.0.0.1 slots=1\n")
    # What the remote ranks' environment gets (DeepSpeed reads DS_ENV_FILE instead of ./.deepspeed_env).
    deepspeed_env = tmp_path / "deepspeed_env"
    deepspeed_env.write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n")
    env = run_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  SSH_PORT=str(local_ssh.port), DS_ENV_FILE=str(deepspeed_env))
    env["PATH"] = f"{local_ssh.bin_dir}:{env['PATH']}"
    env.pop("NODE_RANK", None)
    out = tmp_path / "out"
    result = subprocess.run([str(ROOT / "launch/run_deepspeed.sh"), str(TINY_CONFIG),
                             *train_overrides(demo_data, out, steps=STEPS)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    log = result.stdout
    sshd_log = local_ssh.log.read_text(errors="replace")
    assert result.returncode == 0, log[-6000:] + "\n--- sshd log\n" + sshd_log[-2000:]
    assert "--launcher pdsh" in log and f"--ssh_port {local_ssh.port}" in log, log[-4000:]
    assert "Running on the following workers: localhost,127.0.0.1" in log, log[-4000:]
    # Each node's launcher was started by pdsh over ssh (its output is prefixed with the host name).
    assert "localhost: " in log and "127.0.0.1: " in log, log[-4000:]
    assert "nnodes=2, num_local_procs=1, node_rank=0" in log and "nnodes=2, num_local_procs=1, node_rank=1" in log
    # The launcher's ssh check plus one session per node, all through the private sshd with the test key.
    assert sshd_log.count("Accepted publickey for") >= 3, sshd_log[-3000:]
    assert sorted(logged_losses(log)) == list(range(1, STEPS + 1)), log[-4000:]
    final = out / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file()
    assert len(list(final.glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    # Bad input over pdsh: the wrapper ends with rank 0's one-line error and its exit status 2, not the launcher's.
    bad = subprocess.run([str(ROOT / "launch/run_deepspeed.sh"), str(TINY_CONFIG),
                          *train_overrides(demo_data, tmp_path / "bad", steps=STEPS), "kd.alpha=5"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert bad.returncode == 2, bad.stdout[-4000:]
    summary = bad.stdout[bad.stdout.rfind("[run_deepspeed.sh] rank 0 failed (exit 2)"):]
    assert summary.startswith("[run_deepspeed.sh] rank 0 failed") and "kd.alpha" in summary, bad.stdout[-3000:]
