"""launch/slurm/train.sbatch on a real 2-node SLURM cluster: placement, completion, preemption and requeue."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from launch_support import ROOT, SlurmCluster, free_port, read_log

pytestmark = [pytest.mark.slurm, pytest.mark.dist]

TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
GLOO_TRAINER = Path(__file__).with_name("gloo_trainer.py")
STEPS = 6


def losses(output_dir: Path) -> dict[int, str]:
    """step -> loss text from the trainer's log; a step logged twice (re-done after a resume) must agree."""
    seen: dict[int, str] = {}
    for step, loss in re.findall(r"^step (\d+) loss (\S+)$", (output_dir / "losses.txt").read_text(), re.M):
        assert seen.setdefault(int(step), loss) == loss, f"step {step} logged twice with different losses"
    return seen


def submit_training(cluster: SlurmCluster, run_dir: Path, *overrides: str) -> tuple[str, Path]:
    run_dir.mkdir(parents=True)
    config = run_dir / "run.yaml"
    config.write_text(f"output_dir: {run_dir / 'out'}\nsteps: {STEPS}\n")
    log = run_dir / "job.out"
    job = cluster.submit(TRAIN_SBATCH, str(config), *overrides,
                         sbatch_options=("--nodes=2", f"--output={log}"),
                         TRAIN_SCRIPT=str(GLOO_TRAINER), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return job, log


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    job, log = submit_training(slurm_cluster, run_dir, "step_seconds=0.05")
    assert slurm_cluster.wait(job, log, timeout=120) == "COMPLETED", read_log(log)
    text = read_log(log)
    # One torchrun per node, each on its own SLURM node, one rank each.
    assert re.search(r"\[torchrun_node\] node n1 \(node rank 0 of 2\): 1 rank", text), text
    assert re.search(r"\[torchrun_node\] node n2 \(node rank 1 of 2\): 1 rank", text), text
    assert "training step exited with status 0" in text and "requeueing" not in text, text
    ranks = [json.loads((run_dir / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert {(r["rank"], r["world"], r["node"]) for r in ranks} == {(0, 2, "n1"), (1, 2, "n2")}
    return losses(run_dir / "out")


def test_train_sbatch_runs_two_ranks_on_two_nodes(uninterrupted: dict[int, str]) -> None:
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))


def test_preemption_signal_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, uninterrupted: dict[int, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job, log = submit_training(slurm_cluster, run_dir, "step_seconds=1.0")
    slurm_cluster.wait_for_line(job, log, "step 2", timeout=90)
    # What SLURM does at --signal=B:USR1@N: only the batch shell gets the signal.
    slurm_cluster.signal(job, "USR1", batch_only=True)
    assert slurm_cluster.wait(job, log, timeout=150) == "COMPLETED", read_log(log)

    text = read_log(log)
    assert "got SIGUSR1; forwarding it to the training step" in text, text
    stopped_at = int(re.search(r"checkpointed at step (\d+) after a signal", text).group(1))
    assert 2 <= stopped_at < STEPS, text
    assert f"requeueing job {job}" in text, text
    assert f"job {job} restart 1:" in text, "the requeued run did not start:\n" + text
    assert f"resumed from step {stopped_at}" in text, text
    checkpoints = sorted(p.name for p in (run_dir / "out" / "ckpt").iterdir())
    assert f"step{stopped_at}" in checkpoints and f"step{STEPS}" in checkpoints, checkpoints
    assert losses(run_dir / "out") == uninterrupted
