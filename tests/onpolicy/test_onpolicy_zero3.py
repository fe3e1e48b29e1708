"""On-policy training on 2 CPU ranks, ZeRO-3, in ONE torchrun launch (``tests/engine/run_worker.py``; port 29750).

Jobs: the off-policy reference and the same run with ``kd.on_policy.ratio=0`` (equal losses, exactly); every step
on-policy, same vocabulary and across vocabularies (no deadlock, finite losses, rollout metrics); and ratio 0.5,
uninterrupted and stopped after step 2 then resumed (the resumed steps, on- and off-policy, reproduce the
uninterrupted run's losses). Every run starts from the same saved tiny models (``demo`` fixture).
"""

from __future__ import annotations

import math

import pytest
from engine_helpers import demo_overrides, run_jobs

from dskd_scale.onpolicy import is_on_policy_step

ETA, ETA_ONPOLICY = "configs/tests/tiny_dskd_eta.yaml", "configs/tests/tiny_dskd_eta_onpolicy.yaml"
SAME_ONPOLICY = "configs/tests/tiny_dskd_onpolicy.yaml"
COMMON = ["optim.lr=2.0e-2", "optim.projector_lr=2.0e-2", "checkpoint.export_at_end=false", "log.every_steps=1"]
# Constant LR (no warm-up): a run stopped at step 2 had the same schedule as the 4-step run it is compared with.
RESUME = ["seed=18", "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.every_steps=2"]
TERMS = ("train/loss", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t")

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("onpolicy_runs")

    def job(name, config, same_vocab, extra, out=None):
        overrides = demo_overrides(demo, same_vocab=same_vocab, output_dir=work / (out or name)) + COMMON + extra
        return {"name": name, "config": config, "overrides": overrides}

    off = ["optim.max_steps=3", "checkpoint.every_steps=0"]
    jobs = [job("offpolicy", ETA, False, off),
            job("ratio0", ETA_ONPOLICY, False, [*off, "kd.on_policy.ratio=0"]),
            job("same_ratio1", SAME_ONPOLICY, True, ["optim.max_steps=3", "checkpoint.every_steps=0"]),
            job("eta_ratio1", ETA_ONPOLICY, False, [*off, "kd.on_policy.ratio=1"]),
            job("half", ETA_ONPOLICY, False, [*RESUME, "optim.max_steps=4"]),
            # logs step 2 only: a resumed run keeps that row and adds 3 and 4, a run started over would log 1-4
            job("half_stopped", ETA_ONPOLICY, False, [*RESUME, "optim.max_steps=2", "log.every_steps=2"],
                out="half_resumed"),
            job("half_resumed", ETA_ONPOLICY, False, [*RESUME, "optim.max_steps=4"])]
    results, _ = run_jobs(jobs, work=work, ranks=2, port=29750)
    assert all(entry["exit"] == 0 for entry in results.values()), {k: v["exit"] for k, v in results.items()}
    return results


def test_ratio_zero_reproduces_the_off_policy_run_exactly(runs):
    reference, ratio0 = runs["offpolicy"]["metrics"], runs["ratio0"]["metrics"]
    assert sorted(reference) == sorted(ratio0) == [1, 2, 3]
    for step in reference:
        for term in (*TERMS, "train/ce"):
            assert ratio0[step][term] == reference[step][term], (step, term)
        assert not any(name.startswith("onpolicy/") for name in ratio0[step])  # ratio 0: an off-policy run


@pytest.mark.parametrize("name", ["same_ratio1", "eta_ratio1"])
def test_every_step_on_policy_trains_on_rollouts(runs, name):
    rows = runs[name]["metrics"]
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        for term in TERMS:
            assert math.isfinite(row[term]), (step, term, row)
        assert "train/ce" not in row  # no gold label on an on-policy step
        assert row["onpolicy/step_fraction"] == 1.0
        assert 0 < row["onpolicy/mean_generated_tokens"] <= 12  # kd.on_policy.max_new_tokens
        assert 0.0 <= row["onpolicy/eos_rate"] <= 1.0 and 0.0 <= row["onpolicy/empty_rate"] < 1.0
        assert 0.0 < row["onpolicy/rollout_time_share"] < 1.0
        assert row["train/skipped_steps"] == 0
        coverage = row["onpolicy/alignment_coverage"]
        if name == "same_ratio1":  # identity alignment: every sampled token but the EOS of an empty rollout
            assert coverage == pytest.approx(1.0, abs=1 / 8 / 2)
        else:
            assert 0.1 < coverage <= 1.0
    assert rows[3]["train/loss"] != pytest.approx(rows[1]["train/loss"], rel=1e-3)  # it did train


def test_half_on_policy_resumes_with_the_same_samples_and_losses(runs):
    plan = [is_on_policy_step(18, step, 0.5) for step in range(4)]
    assert plan == [True, False, True, False]  # both kinds of step before and after the resume
    reference, resumed = runs["half"]["metrics"], runs["half_resumed"]["metrics"]
    assert sorted(reference) == [1, 2, 3, 4] and sorted(resumed) == [2, 3, 4]  # resumed at step 2
    for step in (1, 2, 3, 4):
        assert reference[step]["onpolicy/step_fraction"] == float(plan[step - 1])
        assert ("train/ce" in reference[step]) is not plan[step - 1]
    for step in (3, 4):  # after the resume from the step-2 checkpoint
        for term in (*TERMS, *(["onpolicy/mean_generated_tokens", "onpolicy/alignment_coverage"]
                               if plan[step - 1] else ["train/ce"])):
            assert resumed[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-9), (step, term)
