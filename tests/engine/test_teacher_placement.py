"""``teacher.placement``: a ZeRO-3 teacher engine (partitioned, gathered every forward) vs a replicated full copy per
rank (no DeepSpeed). Both on 2 CPU ranks must give the same numbers. Port 29582."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import PROJECT_ROOT, demo_overrides, run_jobs

from dskd_scale.config.loader import ConfigError, load_config
from dskd_scale.config.run import RunConfig

TRAIN = ["optim.max_steps=3", "optim.lr=2.0e-2", "optim.projector_lr=2.0e-2", "checkpoint.every_steps=0",
         "checkpoint.export_at_end=false", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def placement_runs(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("placement")
    jobs = []
    for criterion, precision in (("dskd_eta", "fp32"), ("dskd_eta", "bf16"), ("dskd_cma", "fp32")):
        for placement in ("zero3", "replicated"):
            name = f"{criterion}_{precision}_{placement}"
            overrides = demo_overrides(demo, same_vocab=False, output_dir=work / name) + TRAIN + [
                f"engine.precision={precision}", f"teacher.placement={placement}"]
            jobs.append({"name": name, "config": f"configs/tests/tiny_{criterion}.yaml", "overrides": overrides,
                         "probe_teacher": True})
    results, tensors = run_jobs(jobs, work=work / "launch", ranks=2, port=29582)
    return work, results, tensors


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("criterion,precision", [("dskd_eta", "fp32"), ("dskd_eta", "bf16"), ("dskd_cma", "fp32")])
def test_replicated_teacher_equals_zero3_teacher(placement_runs, criterion, precision):
    """Same saved models, data and seed: the teacher's hidden states are bitwise equal (the same weights and kernels,
    gathered or not), so every loss term of every step agrees; only where the weights live differs."""
    work, results, tensors = placement_runs
    zero3, replicated = (f"{criterion}_{precision}_{placement}" for placement in ("zero3", "replicated"))
    assert tensors[zero3]["teacher_type"] == "DeepSpeedEngine"
    assert tensors[replicated]["teacher_type"] == "ReplicatedTeacher"
    expected_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
    assert tensors[replicated]["teacher_param_dtype"] == expected_dtype
    assert torch.equal(tensors[zero3]["teacher_hidden"], tensors[replicated]["teacher_hidden"])
    a, b = results[zero3]["metrics"], results[replicated]["metrics"]
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        terms = sorted(name for name in a[step] if name.startswith("train/"))  # losses, metrics, grad norm
        assert "train/loss" in terms and "train/kd_t2s" in terms
        for term in terms:
            assert b[step][term] == pytest.approx(a[step][term], rel=1e-6, abs=1e-9), (step, term)
    assert a[3]["train/loss"] != pytest.approx(a[1]["train/loss"], rel=1e-3)  # it trained
    # Where the teacher lives: a partition per rank under ZeRO-3, the whole model on every rank when replicated.
    for rank in (0, 1):
        partitioned = json.loads((work / zero3 / f"teacher_state_rank{rank}.json").read_text())
        full = json.loads((work / replicated / f"teacher_state_rank{rank}.json").read_text())
        assert partitioned["local_elements"] < partitioned["full_elements"]
        assert full["local_elements"] == full["full_elements"] == partitioned["full_elements"]
        assert full["params_requiring_grad"] == full["params_with_grad"] == 0


@pytest.mark.parametrize("overrides,key", [
    (["student.placement=replicated"], "student.placement"),
    (["teacher.placement=everywhere"], "teacher.placement"),
    (["teacher.placement=replicated", "engine.teacher_offload_param=cpu"], "engine.teacher_offload_param"),
])
def test_placement_is_validated_with_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, PROJECT_ROOT / "configs/tests/tiny_dskd_eta.yaml", overrides)
    assert key in str(err.value)


def test_replicated_teacher_is_accepted():
    cfg = load_config(RunConfig, PROJECT_ROOT / "configs/tests/tiny_dskd_eta.yaml", ["teacher.placement=replicated"])
    assert cfg.teacher.placement == "replicated" and cfg.student.placement == "zero3"
