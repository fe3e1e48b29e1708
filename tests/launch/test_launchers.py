"""launch/run_deepspeed.sh (no-ssh, two "nodes" on this machine) and launch/run_mpi.sh (mpiexec, 2 ranks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch_support import ROOT, TINY_CONFIG, DemoData, free_port, logged_losses, run_env, train_overrides

pytestmark = [pytest.mark.dist]

STEPS = 3


@pytest.mark.e2e
def test_run_deepspeed_no_ssh_two_nodes(demo_data: DemoData, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    # Two host names for one machine: the launcher sees two nodes of one slot each.
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = run_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = [str(ROOT / "launch/run_deepspeed.sh"), str(TINY_CONFIG),
               *train_overrides(demo_data, tmp_path / "out", steps=STEPS)]
    nodes = [subprocess.Popen(command, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    assert "nnodes=2, num_local_procs=1, node_rank=0" in logs[0], logs[0][-4000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs[1], logs[1][-4000:]
    assert sorted(logged_losses(logs[0])) == list(range(1, STEPS + 1)), logs[0][-4000:]
    final = tmp_path / "out" / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file()
    assert len(list(final.glob("*zero_pp_rank_*_optim_states.pt"))) == 2


def test_run_mpi_two_ranks_discover_each_other_through_mpi4py(tmp_path: Path) -> None:
    # The stand-in trainer, because DeepSpeed's MPI discovery pins MASTER_PORT to 29500 (outside this folder's
    # port range) for launch/train.py; the launch mechanics under test are the same.
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nsteps: {STEPS}\n")
    env = run_env(NP="2", TRAIN_SCRIPT=str(Path(__file__).with_name("gloo_trainer.py")),
                  MASTER_PORT=str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK"):
        env.pop(var, None)
    done = subprocess.run([str(ROOT / "launch/run_mpi.sh"), str(config)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = sorted(json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["rank"] for r in range(2))
    worlds = {json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["world"] for r in range(2)}
    assert ranks == [0, 1] and worlds == {2}
    assert (tmp_path / "out" / "losses.txt").read_text().count("\n") == STEPS
