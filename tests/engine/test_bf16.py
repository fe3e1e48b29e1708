"""bf16 under ZeRO-3 on 2 CPU ranks: the precision every GPU recipe uses, exercised on every CI run.

One launch (``run_worker.py``) trains every criterion for 2 steps in bf16 and for 1 step in fp32 from the same
saved models and data, probes the t2s projector's fp32 master weight right after the engine build, and runs a
bf16 checkpoint/resume and a bf16 LoRA student. Ports 29580 and 29584.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import demo_overrides, run_jobs

from dskd_scale.config.run import CRITERIA

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

SAME_VOCAB = {"sft", "vanilla_kd", "dskd"}  # the criteria whose tiny configs use one tokenizer on both sides
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7
QUIET = ["checkpoint.export_at_end=false", "checkpoint.every_steps=0", "log.tensorboard=false"]


def _job(demo, work, name: str, criterion: str, extra: list[str], *, folder: str = "", **probes) -> dict:
    overrides = demo_overrides(demo, same_vocab=criterion in SAME_VOCAB, output_dir=work / (folder or name))
    if criterion == "mined":
        overrides.append(f"kd.mined_map={work / 'mined_map.safetensors'}")
    return {"name": name, "config": f"configs/tests/tiny_{criterion}.yaml", "overrides": overrides + extra,
            **probes}


def _mined_map(demo, path) -> None:
    from transformers import AutoTokenizer

    from dskd_scale.alignment.mined import build_mined_map, save_mined_map

    teacher = AutoTokenizer.from_pretrained(demo["teacher_tokenizer"])
    student = AutoTokenizer.from_pretrained(demo["student_tokenizer"])
    save_mined_map(str(path), build_mined_map(teacher, student), {"teacher_tokenizer": "demo",
                                                                   "student_tokenizer": "demo"})


@pytest.fixture(scope="module")
def bf16_runs(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("bf16")
    _mined_map(demo, work / "mined_map.safetensors")
    bf16 = ["engine.precision=bf16"]
    jobs = []
    for criterion in CRITERIA:
        probe = criterion == "dskd_eta"
        jobs.append(_job(demo, work, f"{criterion}_bf16", criterion, bf16 + QUIET + ["optim.max_steps=2"],
                         probe_master=probe))
        jobs.append(_job(demo, work, f"{criterion}_fp32", criterion,
                         QUIET + ["optim.max_steps=1", "optim.warmup_steps=1"]))  # first-step losses only
    # Checkpoint/resume in bf16: 4 uninterrupted steps (with the in-run bf16 export) vs 2 steps, then a resume to 4.
    resume = ["checkpoint.every_steps=2", "log.tensorboard=false", "optim.lr=2.0e-2", "optim.projector_lr=2.0e-2"]
    jobs.append(_job(demo, work, "resume_ref", "dskd_eta", bf16 + resume + ["optim.max_steps=4"]))
    jobs.append(_job(demo, work, "resume_part", "dskd_eta",
                     bf16 + resume + ["optim.max_steps=2", "checkpoint.export_at_end=false"]))
    jobs.append(_job(demo, work, "resume_rest", "dskd_eta",  # same folder: resumes from resume_part's step 2
                     bf16 + resume + ["optim.max_steps=4", "checkpoint.export_at_end=false"], folder="resume_part"))
    # peft upcasts LoRA adapters to fp32 beside bf16 base weights: one engine dtype is needed there too.
    jobs.append(_job(demo, work, "lora_bf16", "dskd_eta", bf16 + QUIET + [
        "optim.max_steps=2", "student.lora.enabled=true", "student.lora.target_modules=[c_attn]"]))
    results, tensors = run_jobs(jobs, work=work / "launch", ranks=2, port=29580)
    return work, results, tensors


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_trains_in_bf16_under_zero3(bf16_runs, criterion):
    _, results, _ = bf16_runs
    run = results[f"{criterion}_bf16"]
    assert run["exit"] == 0
    assert sorted(run["metrics"]) == [1, 2]
    for step, row in run["metrics"].items():
        terms = {name: value for name, value in row.items() if name.startswith("train/")}
        assert all(math.isfinite(value) for value in terms.values()), (step, terms)
        assert row["train/skipped_steps"] == 0 and row["train/nonfinite_losses"] == 0
    assert run["metrics"][2]["train/loss"] != run["metrics"][1]["train/loss"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_bf16_first_step_losses_match_fp32_within_bf16_precision(bf16_runs, criterion):
    """Same models, data and seed; the first step's terms differ only by bf16 rounding (weights, activations).

    Each term is a mean over rows of log-probability expressions computed in fp32 from bf16 logits; rounding the
    inputs to bf16 (relative error <= eps/2 per value) moves a mean by at most about one bf16 epsilon relative to
    the magnitude of the log-probabilities it averages. Terms near zero (KL of two nearly equal distributions)
    are held to the same absolute bound at unit scale (``abs = eps``).
    """
    _, results, _ = bf16_runs
    low, full = results[f"{criterion}_bf16"]["metrics"][1], results[f"{criterion}_fp32"]["metrics"][1]
    terms = [name for name in full if name.startswith("train/") and name not in (
        "train/skipped_steps", "train/nonfinite_losses", "train/grad_norm") and "agreement" not in name
        and not name.endswith("_acc") and "coverage" not in name and "aligned" not in name]
    assert "train/loss" in terms and "train/ce" in terms
    for name in terms:
        assert low[name] == pytest.approx(full[name], rel=BF16_EPS, abs=BF16_EPS), (name, low[name], full[name])


def test_projector_master_weight_is_the_fp32_pinv_init_not_its_bf16_rounding(bf16_runs):
    """Right after the engine build: the optimizer's fp32 master copy of the t2s projector is ``pinv(W_s^O) W_t^O``
    to fp32 accuracy (reference from the equation, in fp64), the bf16 parameter is its rounding, and the master
    is not itself a bf16 value (DeepSpeed would have built it from the bf16 parameter)."""
    _, _, tensors = bf16_runs
    probe = tensors["dskd_eta_bf16"]
    assert probe["param_dtype"] == "torch.bfloat16"
    master, param = probe["master"], probe["param"]
    reference = (torch.linalg.pinv(probe["student_rows"]) @ probe["teacher_rows"]).float()
    assert master.dtype == torch.float32 and master.shape == reference.shape
    rounded = master.to(torch.bfloat16).float()
    assert torch.equal(param, rounded)
    master_error = (master.double() - reference.double()).abs().max().item()
    rounding_error = (rounded.double() - reference.double()).abs().max().item()
    # fp32 pinv of an O x D matrix: error ~ (O + D) fp32 eps relative to the entries; bf16 rounding is ~2^16 larger.
    scale = reference.abs().max().item()
    bound = (probe["student_rows"].shape[0] + master.shape[0]) * torch.finfo(torch.float32).eps * scale
    assert master_error <= bound, (master_error, bound)
    assert rounding_error > 100 * master_error, (rounding_error, master_error)
    assert (master != rounded).float().mean() > 0.9  # nearly every entry needs fp32 bits
    assert probe["s2t_dtypes"] == ["torch.float32", "torch.float32"]  # the closed-form s2t map stays fp32


def test_bf16_resume_reproduces_the_uninterrupted_run(bf16_runs):
    _, results, _ = bf16_runs
    reference, resumed = results["resume_ref"]["metrics"], results["resume_rest"]["metrics"]
    assert sorted(results["resume_part"]["metrics"]) == [1, 2]
    # The second run appended steps 3 and 4 to the first one's metrics: it resumed at step 2, not from scratch.
    assert sorted(resumed) == [1, 2, 3, 4] and results["resume_rest"]["train_rows"] == 4
    for step in (3, 4):
        for term in ("train/loss", "train/ce", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t"):
            assert resumed[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-9), (step, term)


def test_bf16_export_is_bf16_and_reloads_with_the_live_logits(bf16_runs):
    from transformers import AutoModelForCausalLM

    work, _, _ = bf16_runs
    folder = work / "resume_ref" / "export"
    probe = torch.load(folder / "probe.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    # The same bf16 weights and kernels: equal up to one bf16 rounding of the logits.
    torch.testing.assert_close(logits, probe["logits"], rtol=BF16_EPS, atol=BF16_EPS * probe["logits"].abs().max())


def test_lora_student_trains_in_bf16(bf16_runs):
    _, results, _ = bf16_runs
    rows = results["lora_bf16"]["metrics"]
    assert sorted(rows) == [1, 2] and all(math.isfinite(row["train/loss"]) for row in rows.values())


def test_master_weights_start_from_fp32_values_also_in_padded_partitions(tmp_path):
    """Odd-sized parameters over 2 ranks: the last rank's partitions are padded, where DeepSpeed 0.19's
    ``safe_set_full_fp32_param`` slices past the end of the value (``start (5) + length (5) exceeds dimension size
    (9)``); the fp32 master weights must still equal the fp32 values exactly. Port 29584."""
    import json
    import subprocess
    import sys

    from engine_helpers import PROJECT_ROOT, check, run_env

    result = tmp_path / "master.json"
    script = PROJECT_ROOT / "tests" / "engine" / "master_weights_check.py"
    check(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", "29584", str(script), str(result)],
                         cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True, timeout=240))
    report = json.loads(result.read_text())
    assert sorted(entry["numel"] for entry in report.values()) == [1, 3, 3, 9]
    for name, entry in report.items():
        assert entry["dtype"] == "torch.bfloat16", name
        assert entry["fp32_differs_from_bf16"] and entry["master_equals_fp32"], (name, entry)
