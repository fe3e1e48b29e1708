"""2-rank ZeRO-3 CPU training runs through launch/train.py (gloo), each launch checking several behaviours.

Ports 29520-29539. Every run starts from the same saved tiny models (``demo`` fixture).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import PROJECT_ROOT, check, demo_overrides, launch, logits_tolerance, metrics, start_rank

ETA_CONFIG = "configs/tests/tiny_dskd_eta.yaml"
DSKD_CONFIG = "configs/tests/tiny_dskd.yaml"
STEPS = ["optim.max_steps=4", "checkpoint.every_steps=2", "optim.lr=2.0e-2", "optim.projector_lr=2.0e-2"]

pytestmark = [pytest.mark.dist, pytest.mark.e2e]


def _reload_logits(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    probe = torch.load(folder / "probe.pt")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"]).logits.float(), probe["logits"]


def _same_weights_tolerance(folder: Path, logits: torch.Tensor) -> dict[str, float]:
    """The live run (2 ranks, one thread each) and this process may sum in another order; nothing else differs."""
    from transformers import AutoConfig

    return logits_tolerance(AutoConfig.from_pretrained(folder), logits)


@pytest.fixture(scope="module")
def eta_run(demo, tmp_path_factory) -> Path:
    """The uninterrupted reference: dskd_eta, 2 ranks, ZeRO-3, 4 steps, checkpoints at 2 and 4, export at end."""
    out = tmp_path_factory.mktemp("eta_ref")
    check(launch(ETA_CONFIG, demo_overrides(demo, same_vocab=False, output_dir=out) + STEPS, ranks=2, port=29520))
    return out


def test_dskd_eta_zero3_trains_exports_and_keeps_teacher_frozen(eta_run):
    rows = metrics(eta_run)
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():
        for term in ("train/ce", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t", "train/loss"):
            assert math.isfinite(row[term]), (term, row)
        assert row["train/alignment_ratio"] > 0
    assert rows[4]["train/skipped_steps"] == 0
    # The teacher received no gradient and stayed partitioned on both ranks: its largest matrix (the embedding)
    # is not materialised, each rank stores half of it, and no rank holds the whole teacher.
    for rank in (0, 1):
        state = json.loads((eta_run / f"teacher_state_rank{rank}.json").read_text())
        assert state["params_with_grad"] == 0 and state["params_requiring_grad"] == 0
        assert state["local_elements"] < state["full_elements"], state
        assert state["largest_param_local_elements"] == 0, state
        assert state["largest_param_partition_elements"] == -(-state["largest_param_full_elements"] // 2), state
    # Checkpoints: both complete, latest names the newest; DS configs saved with the run.
    checkpoints = eta_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    for tag in ("step_00000002", "step_00000004"):
        assert (checkpoints / tag / "COMPLETE").is_file()
        assert (checkpoints / tag / "run_config.yaml").is_file()
    assert list((eta_run / "tensorboard").glob("events.out.tfevents.*"))  # rank-0 TensorBoard scalars
    assert (eta_run / "run_config.yaml").is_file()
    ds_config = json.loads((eta_run / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["gradient_accumulation_steps"] == 2
    # In-run export reloads with identical logits; projectors saved separately.
    reloaded, live = _reload_logits(eta_run / "export")
    torch.testing.assert_close(reloaded, live, **_same_weights_tolerance(eta_run / "export", live))
    from safetensors.torch import load_file

    projectors = load_file(eta_run / "export" / "projectors.safetensors")
    assert projectors["t2s_projector.weight"].shape == (32, 48)


def test_offline_export_of_checkpoint_matches_in_run_export(eta_run, tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "export.py"), str(eta_run / "checkpoints"),
                             str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240)
    check(result)
    reloaded, offline_probe = _reload_logits(out)
    _, live = _reload_logits(eta_run / "export")
    torch.testing.assert_close(reloaded, live, **_same_weights_tolerance(out, live))
    torch.testing.assert_close(offline_probe, live, **_same_weights_tolerance(out, live))


def test_signal_on_one_rank_checkpoints_all_then_resume_matches_uninterrupted(demo, eta_run, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks agree at the next step boundary, save one complete checkpoint and exit 75;
    the resumed run then reproduces the uninterrupted run's losses step for step."""
    out = tmp_path / "interrupted"
    overrides = demo_overrides(demo, same_vocab=False, output_dir=out) + STEPS + ["checkpoint.export_at_end=false"]
    ranks = [start_rank(ETA_CONFIG, overrides, rank=r, world=2, port=29522) for r in (0, 1)]
    try:
        deadline = time.time() + 200
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            assert all(p.poll() is None for p in ranks), [p.communicate()[0][-3000:] for p in ranks]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGUSR1)
        outputs = [p.communicate(timeout=200)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
    checkpoints = out / "checkpoints"
    stopped_tag = (checkpoints / "latest").read_text()
    stopped_at = int(stopped_tag.split("_")[1])
    assert 1 <= stopped_at < 4 and (checkpoints / stopped_tag / "COMPLETE").is_file()

    resumed = launch(ETA_CONFIG, overrides, ranks=2, port=29524)
    check(resumed)
    assert f"resumed from {checkpoints / stopped_tag} at step {stopped_at}" in resumed.stderr
    reference, after = metrics(eta_run), metrics(out)
    assert sorted(after) == [1, 2, 3, 4]
    for step in range(stopped_at + 1, 5):
        for term in ("train/loss", "train/ce", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t"):
            assert after[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-9), (step, term)


def test_latest_never_names_a_partial_checkpoint(eta_run, tmp_path):
    """A crash mid-save leaves a folder without COMPLETE; resume picks the newest complete one instead."""
    from dskd_scale.engine.checkpoint import latest_complete_tag

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(eta_run / "checkpoints", checkpoints)
    (checkpoints / "step_00000004" / "COMPLETE").unlink()  # as if rank 1 died while writing step 4
    assert latest_complete_tag(checkpoints) == "step_00000002"
    (checkpoints / "latest").write_text("step_00000006")  # names a folder that does not exist
    assert latest_complete_tag(checkpoints) == "step_00000002"


def test_dskd_same_vocab_zero3_equals_zero0(demo, tmp_path):
    """Same-vocabulary DSKD on 2 ranks: ZeRO-3 (partitioned heads, routed head gradient) gives the same losses as
    ZeRO-0 (plain data parallel) for every step, with a learning rate large enough for a wrong gradient to show."""
    runs = {}
    for stage, port in ((3, 29526), (0, 29528)):
        out = tmp_path / f"stage{stage}"
        overrides = demo_overrides(demo, same_vocab=True, output_dir=out) + STEPS + [
            f"engine.zero_stage={stage}", "checkpoint.export_at_end=false", "checkpoint.every_steps=0"]
        check(launch(DSKD_CONFIG, overrides, ranks=2, port=port))
        runs[stage] = metrics(out)
    assert sorted(runs[3]) == [1, 2, 3, 4]
    assert runs[3][1]["train/alignment_ratio"] == pytest.approx(1.0)  # identity alignment: fused CE path
    for step in range(1, 5):
        for term in ("train/loss", "train/ce", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t"):
            assert runs[3][step][term] == pytest.approx(runs[0][step][term], rel=2e-4, abs=1e-6), (step, term)
    assert runs[3][4]["train/loss"] != pytest.approx(runs[3][1]["train/loss"], rel=1e-3)  # it did train


@pytest.mark.assets
def test_dskd_eta_real_vocabularies_llama2_to_gpt2(asset, tmp_path):
    """The shared tiny Llama-2 teacher (32000 tokens) -> tiny GPT-2 student (50257 tokens) on real Dolly rows."""
    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign

    teacher, student = asset("models/llama-2-tiny-random-hf"), asset("models/tiny-gpt2")
    teacher_tok, student_tok = asset("tokenizers/llama2"), asset("tokenizers/gpt2")
    dolly = asset("data/dolly/dev.jsonl")
    rows = tmp_path / "dolly32.jsonl"
    rows.write_text("".join(dolly.read_text().splitlines(keepends=True)[:32]))
    run_prealign(PrealignConfig(teacher_tokenizer=str(teacher_tok), student_tokenizer=str(student_tok),
                                data=(str(rows),), out=str(tmp_path / "pre"), max_length=96))
    out = tmp_path / "run"
    result = launch("configs/tests/tiny_dskd_eta_assets.yaml", [
        f"teacher.path={teacher}", f"teacher.tokenizer={teacher_tok}", f"student.path={student}",
        f"student.tokenizer={student_tok}", f"data.train_dir={tmp_path / 'pre'}", f"output_dir={out}",
        "optim.max_steps=2", "checkpoint.export_at_end=false"], ranks=2, port=29530)
    check(result)
    rows_by_step = metrics(out)
    assert sorted(rows_by_step) == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/alignment_ratio"] > 0.2 for r in rows_by_step.values())
