"""launch/slurm/train.sbatch with the real launch/train.py on a 2-node SLURM cluster: placement, completion,
preemption (USR1 to the batch shell), requeue and a resume whose losses equal an uninterrupted run's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from launch_support import (
    ROOT,
    TINY_CONFIG,
    DemoData,
    SlurmCluster,
    free_port,
    logged_losses,
    read_log,
    train_overrides,
)

pytestmark = [pytest.mark.slurm, pytest.mark.dist, pytest.mark.e2e]

TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
STEPS = 8


def submit_training(cluster: SlurmCluster, demo: DemoData, run_dir: Path, *, launcher: str) -> tuple[str, Path]:
    log = run_dir / "job.out"
    run_dir.mkdir(parents=True)
    job = cluster.submit(TRAIN_SBATCH, str(TINY_CONFIG), *train_overrides(demo, run_dir / "out", steps=STEPS),
                         sbatch_options=("--nodes=2", f"--output={log}"),
                         LAUNCHER=launcher, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return job, log


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, demo_data: DemoData,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # One SLURM task per rank here; the preemption test below uses the default (torchrun per node), so the
    # loss comparison also shows that both launch modes train the same 2-rank world.
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    job, log = submit_training(slurm_cluster, demo_data, run_dir, launcher="srun")
    assert slurm_cluster.wait(job, log, timeout=240) == "COMPLETED", read_log(log)
    return run_dir, read_log(log)


def test_train_sbatch_runs_one_rank_on_each_of_two_nodes(uninterrupted: tuple[Path, str]) -> None:
    run_dir, text = uninterrupted
    assert re.search(r"\[srun_rank\] rank 0 of 2 \(local rank 0\) on node n1", text), text
    assert re.search(r"\[srun_rank\] rank 1 of 2 \(local rank 0\) on node n2", text), text
    assert "training step exited with status 0" in text and "requeueing" not in text, text
    assert sorted(logged_losses(text)) == list(range(1, STEPS + 1)), text
    final = run_dir / "out" / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file(), sorted(p.name for p in final.parent.iterdir())
    # ZeRO-3 writes one optimizer partition per rank: two files means a world of two ranks.
    assert len(list(final.glob("*zero_pp_rank_*_optim_states.pt"))) == 2, sorted(p.name for p in final.iterdir())


def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(
    slurm_cluster: SlurmCluster, demo_data: DemoData, uninterrupted: tuple[Path, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job, log = submit_training(slurm_cluster, demo_data, run_dir, launcher="torchrun")
    slurm_cluster.wait_for_line(job, log, "dskd_scale.loop: step 2 ", timeout=200)
    # What SLURM does at --signal=B:USR1@N: only the batch shell gets the signal; it must relay it.
    slurm_cluster.signal(job, "USR1", batch_only=True)
    assert slurm_cluster.wait(job, log, timeout=240) == "COMPLETED", read_log(log)

    text = read_log(log)
    assert re.search(r"\[torchrun_node\] node n1 \(node rank 0 of 2\): 1 rank", text), text
    assert re.search(r"\[torchrun_node\] node n2 \(node rank 1 of 2\): 1 rank", text), text
    assert "got SIGUSR1; forwarding it to the training step" in text, text
    stop = re.search(r"stop signal: checkpointing at step (\d+) and exiting with 75", text)
    assert stop, "the ranks never acted on the forwarded signal:\n" + text
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < STEPS, text
    signal_checkpoint = run_dir / "out" / "checkpoints" / f"step_{stopped_at:08d}"
    assert (signal_checkpoint / "COMPLETE").is_file(), "the signal checkpoint is missing or incomplete"
    assert f"requeueing job {job}" in text and f"job {job} restart 1:" in text, text
    assert f"resumed from {signal_checkpoint} at step {stopped_at}" in text, text
    assert logged_losses(text) == logged_losses(uninterrupted[1])
