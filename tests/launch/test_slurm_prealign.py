"""launch/slurm/prealign.sbatch: 2 MPI ranks on 2 SLURM nodes (srun --mpi=pmi2 + mpi4py) write the same bytes as
one process, and a re-submitted job rebuilds only what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_support import ROOT, DemoData, SlurmCluster, read_log

pytestmark = [pytest.mark.slurm, pytest.mark.dist]

PREALIGN_SBATCH = ROOT / "launch" / "slurm" / "prealign.sbatch"


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_prealign(cluster: SlurmCluster, demo: DemoData, out: Path, log: Path) -> str:
    job = cluster.submit(PREALIGN_SBATCH, *demo.prealign_args, "--out", str(out),
                         sbatch_options=("--nodes=2", "--ntasks-per-node=1", f"--output={log}"))
    assert cluster.wait(job, log, timeout=180) == "COMPLETED", read_log(log)
    return read_log(log)


def test_two_rank_prealign_equals_single_process_and_resumes(
    slurm_cluster: SlurmCluster, demo_data: DemoData, tmp_path: Path
) -> None:
    out = tmp_path / "prealigned"
    text = run_prealign(slurm_cluster, demo_data, out, tmp_path / "first.out")
    # Rank r of W builds shards r, r+W, ... (dskd_scale/prealign/pipeline.py): rank 0 of 2 owns shards 0 and 2 only,
    # which a lone rank (MPI not wired through srun) would not.
    assert "rank 0 wrote shard-00000.parquet" in text and "rank 0 wrote shard-00002.parquet" in text, text
    assert "rank 0 wrote shard-00001.parquet" not in text and "rank 0 wrote shard-00003.parquet" not in text, text
    reference = tree_bytes(demo_data.prealigned)
    assert tree_bytes(out) == reference

    (out / "shard-00001.parquet").unlink()  # rank 1's shard lost, e.g. a node died mid-job
    text = run_prealign(slurm_cluster, demo_data, out, tmp_path / "second.out")
    assert "rank 0: 2 of its 2 shards are complete and checksum-valid; skipping them" in text, text
    assert "rank 0 wrote" not in text, text
    assert tree_bytes(out) == reference
