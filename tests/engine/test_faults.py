"""Faults: non-finite values (one rank, the teacher, a diverged run), a full disk, kills around checkpoint
bookkeeping, resumed metrics. Checkpoint bookkeeping without a process group, then 2-rank ZeRO-3 CPU runs.

Ports 29570-29579. The full-disk cases mount a small tmpfs (root only; they skip with the reason otherwise).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import check, demo_overrides, launch, start_rank

from dskd_scale.engine import checkpoint as ckpt

ETA_CONFIG = "configs/tests/tiny_dskd_eta.yaml"
RANK_TIMEOUT_S = 240


# ---- tmpfs ----------------------------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, size_bytes: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("a full filesystem is simulated with a tmpfs mount, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size_bytes // 1024)}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _resize_tmpfs(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={-(-size_bytes // 1024)}k", str(path)], check=True)


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _used_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


# ---- checkpoint bookkeeping, no process group --------------------------------------------------------------------

class _FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: ``module`` and ``save_checkpoint`` (torch.save of a
    tensor of ``payload_bytes``, like DeepSpeed's serialiser)."""

    def __init__(self, payload_bytes: int) -> None:
        self.module = torch.nn.Linear(1, 1, bias=False)
        self.payload = torch.zeros(payload_bytes // 4, dtype=torch.float32)

    def save_checkpoint(self, save_dir: str, *, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"payload": self.payload, **client_state}, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _save(engine, save_dir: Path, step: int, keep_last: int = 3) -> Path:
    return ckpt.save_checkpoint(engine, save_dir, step, client_state={"loop": {"step": step}},
                                extra_files={"run_config.yaml": "a: 1\n"}, keep_last=keep_last)


def test_complete_lists_the_files_and_resume_skips_checkpoints_whose_files_do_not_match(tmp_path):
    engine = _FakeEngine(4096)
    for step in (1, 2, 3):
        _save(engine, tmp_path, step)
    listed = json.loads((tmp_path / ckpt.step_tag(3) / ckpt.COMPLETE_MARKER).read_text())["files"]
    assert set(listed) == {"zero_pp_rank_0_mp_rank_00_model_states.pt", "rng_rank00000.pt", "run_config.yaml"}
    assert (tmp_path / "latest").read_text() == ckpt.step_tag(3)
    # A kill between COMPLETE and `latest`: `latest` lags; resume takes the newest complete checkpoint.
    (tmp_path / "latest").write_text(ckpt.step_tag(2))
    assert ckpt.latest_complete_tag(tmp_path) == ckpt.step_tag(3)
    # Files lost after COMPLETE (a truncated partition, a missing RNG file): not trusted, the previous one is.
    rank_file = tmp_path / ckpt.step_tag(3) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    assert "has 100 bytes" in ckpt.verify(tmp_path / ckpt.step_tag(3))
    assert ckpt.latest_complete_tag(tmp_path) == ckpt.step_tag(2)
    (tmp_path / ckpt.step_tag(2) / "rng_rank00000.pt").unlink()
    assert ckpt.verify(tmp_path / ckpt.step_tag(2)) == "rng_rank00000.pt is missing"
    assert ckpt.latest_complete_tag(tmp_path) == ckpt.step_tag(1)
    with pytest.raises(FileNotFoundError, match="rng_rank00000.pt is missing"):
        ckpt.load_checkpoint(engine, tmp_path, ckpt.step_tag(2))


def test_pruning_removes_complete_before_any_file(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted must not leave a folder that still claims to be complete."""
    engine = _FakeEngine(4096)
    for step in (1, 2):
        _save(engine, tmp_path, step, keep_last=1)  # saving 2 prunes 1
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree_after_complete_is_gone(path, *args, **kwargs):
        seen.append((Path(path).name, (Path(path) / ckpt.COMPLETE_MARKER).exists()))
        raise KeyboardInterrupt  # "killed" before a single file is deleted

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_after_complete_is_gone)
    with pytest.raises(KeyboardInterrupt):
        _save(engine, tmp_path, 3, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert seen == [(ckpt.step_tag(2), False)]
    assert ckpt.complete_tags(tmp_path) == [ckpt.step_tag(3)]  # the half-deleted folder is not complete


def test_a_save_at_an_already_complete_step_moves_latest_and_resume_drops_rerun_metric_rows(tmp_path):
    from dskd_scale.loop import _drop_metrics_after

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
                       + json.dumps({"step": 4, "eval/loss": 0.5}) + "\n" + '{"step": 5, "train/lo')  # killed
    _drop_metrics_after(metrics, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    engine = _FakeEngine(4096)
    _save(engine, tmp_path / "checkpoints", 2)
    ckpt.mark_latest(tmp_path / "checkpoints", ckpt.step_tag(2))
    assert (tmp_path / "checkpoints" / "latest").read_text() == ckpt.step_tag(2)


def test_full_disk_during_a_write_names_the_path_and_cause_and_keeps_latest(tmp_path):
    """torch's serialiser fails on ENOSPC with an unrelated message; the error must say what happened."""
    save_dir = tmp_path / "checkpoints"
    _mount_tmpfs(save_dir, 1 << 20)
    try:
        _save(_FakeEngine(64 << 10), save_dir, 1)
        # Passes the space check (the last checkpoint was small), then fills the disk while writing.
        with pytest.raises(ckpt.CheckpointWriteError) as caught:
            _save(_FakeEngine(4 << 20), save_dir, 2)
        message = str(caught.value)
        assert f"cannot write checkpoint {save_dir / ckpt.step_tag(2)} (rank 0)" in message, message
        assert "No space left on device" in message and "ENOSPC" in message, message
        assert f"`latest` still names {ckpt.step_tag(1)}" in message, message
        assert caught.value.reporter and caught.value.resumable
        del caught  # its traceback holds the serialiser's open (deleted) file, and with it the space
        gc.collect()
        assert (save_dir / "latest").read_text() == ckpt.step_tag(1)
        assert ckpt.latest_complete_tag(save_dir) == ckpt.step_tag(1)
        assert not (save_dir / ckpt.step_tag(2)).exists()  # the partial folder is gone: its space is free again
        # The space check refuses before writing anything once a checkpoint is known not to fit.
        assert _free(save_dir) > 512 << 10
        (save_dir / "filler").write_bytes(b"\0" * (_free(save_dir) - (16 << 10)))
        with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device .ENOSPC"):
            _save(_FakeEngine(64 << 10), save_dir, 3)
        assert not (save_dir / ckpt.step_tag(3)).exists()
        assert (save_dir / "latest").read_text() == ckpt.step_tag(1)
    finally:
        _unmount(save_dir)


def test_a_write_error_that_a_requeue_cannot_cure_is_not_resumable(tmp_path):
    class ReadOnly(_FakeEngine):
        def save_checkpoint(self, save_dir: str, **kwargs) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), save_dir)

    with pytest.raises(ckpt.CheckpointWriteError, match=r"Read-only file system \(EROFS\)") as caught:
        _save(ReadOnly(16), tmp_path, 1)
    assert not caught.value.resumable
    assert "no complete checkpoint exists yet" in str(caught.value)


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


# ---- 2-rank ZeRO-3 runs ---------------------------------------------------------------------------------------

def _run_ranks(overrides: list[str], port: int) -> tuple[list[int], list[str]]:
    ranks = [start_rank(ETA_CONFIG, overrides, rank=r, world=2, port=port) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=RANK_TIMEOUT_S)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in ranks], outputs


def _rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _rank_loop_states(tag_dir: Path) -> list[dict]:
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    assert len(files) == 2, list(tag_dir.iterdir())
    return [torch.load(f, weights_only=False, map_location="cpu")["loop"] for f in files]


@pytest.fixture(scope="module")
def nan_teacher_run(demo, tmp_path_factory) -> tuple[Path, list[str]]:
    """The teacher's embedding row of a token that occurs in exactly one training row is NaN: one micro-batch on
    one rank sees a NaN teacher. One epoch of 3 steps (48 rows = 3 x 2 ranks x 2 micro-batches x 4 rows), so
    that row is used exactly once. Checkpoint every step."""
    from transformers import AutoModelForCausalLM

    from dskd_scale.data.dataset import PrealignedDataset

    root = tmp_path_factory.mktemp("nan_teacher")
    train = PrealignedDataset.open(demo["eta"], expected_teacher_fingerprint=None, expected_student_fingerprint=None)
    assert len(train) == 48
    rows_with = Counter()
    for index in range(len(train)):
        rows_with.update(set(train[index]["teacher_input_ids"].tolist()))
    poisoned = min(token for token, rows in rows_with.items() if rows == 1)
    teacher = AutoModelForCausalLM.from_pretrained(demo["teacher"])
    with torch.no_grad():
        teacher.get_input_embeddings().weight[poisoned] = float("nan")
    teacher.save_pretrained(root / "teacher_nan")
    out = root / "out"
    overrides = [o for o in demo_overrides(demo, same_vocab=False, output_dir=out) if not o.startswith("teacher.path=")]
    overrides += [f"teacher.path={root / 'teacher_nan'}", "optim.max_steps=3", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=3", "checkpoint.export_at_end=false", "log.tensorboard=false"]
    result = launch(ETA_CONFIG, overrides, ranks=2, port=29570)
    check(result)
    return out, overrides


def test_nan_teacher_on_one_rank_is_counted_once_on_every_rank_and_its_step_is_not_logged(nan_teacher_run):
    out, _ = nan_teacher_run
    rows = [row for row in _rows(out) if "train/skipped_steps" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    final = rows[-1]
    assert final["train/skipped_steps"] == 1
    assert final["train/nonfinite_losses"] == 1 and final["train/nonfinite_teacher"] == 1, final
    before = [0] + [row["train/skipped_steps"] for row in rows[:-1]]
    skipped = [row for row, earlier in zip(rows, before, strict=True) if row["train/skipped_steps"] > earlier]
    assert len(skipped) == 1
    # The skipped step logs no loss (not a finite, too-low number); the applied steps log finite ones.
    assert not any(name.startswith(("train/loss", "train/ce", "train/kd")) for name in skipped[0]), skipped[0]
    for row in rows:
        if row is not skipped[0]:
            assert all(row[name] == row[name] and abs(row[name]) < float("inf")
                       for name in ("train/loss", "train/ce", "train/kd_t2s")), row
    # Every rank holds the same (global) counters, in every checkpoint (the agreement hits are this rank's share,
    # summed in the next step's collective).
    tokens = []
    for step in (1, 2, 3):
        states = [{k: v for k, v in state.items() if not k.startswith("agreement_")}
                  for state in _rank_loop_states(out / "checkpoints" / ckpt.step_tag(step))]
        assert states[0] == states[1], (step, states)
        tokens.append(states[0]["student_tokens"])
    assert states[0]["nonfinite_losses"] == 1 and states[0]["nonfinite_teacher"] == 1
    assert states[0]["skipped_steps"] == 1
    assert states[0]["consecutive_skipped_steps"] == (1 if skipped[0]["step"] == 3 else 0)
    assert final["train/student_tokens"] == tokens[-1] and 0 < tokens[0] < tokens[1] < tokens[2]


def test_resume_after_lagging_latest_and_half_pruned_checkpoint_then_full_disk_exits_75(nan_teacher_run, tmp_path):
    """Resume: `latest` one behind (kill between COMPLETE and `latest`), the newest folder half-deleted but still
    marked COMPLETE (a kill mid-prune, before this fix). The run resumes from the newest checkpoint that verifies,
    drops the metric rows it re-runs, then finds the disk full at its next checkpoint: one clear error on rank 0,
    exit 75 on both ranks, `latest` on the last complete checkpoint."""
    source, overrides = nan_teacher_run
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    _mount_tmpfs(checkpoints, 256 << 20)
    try:
        for tag in (ckpt.step_tag(s) for s in (1, 2, 3)):
            shutil.copytree(source / "checkpoints" / tag, checkpoints / tag)
        shutil.copy(source / "metrics.jsonl", out / "metrics.jsonl")
        (checkpoints / "latest").write_text(ckpt.step_tag(1))
        for path in (checkpoints / ckpt.step_tag(3)).iterdir():
            if path.name != ckpt.COMPLETE_MARKER:
                path.unlink()
        checkpoint_bytes = sum(p.stat().st_size for p in (checkpoints / ckpt.step_tag(2)).iterdir())
        _resize_tmpfs(checkpoints, _used_bytes(checkpoints) + checkpoint_bytes // 3)
        run_overrides = [o.replace(str(source), str(out)) if o.startswith("output_dir=") else o for o in overrides]
        codes, outputs = _run_ranks(run_overrides, port=29572)
        assert codes == [75, 75], outputs[0][-4000:] + outputs[1][-4000:]
        assert f"resumed from {checkpoints / ckpt.step_tag(2)} at step 2" in outputs[0], outputs[0][-4000:]
        errors = [line for line in outputs[0].splitlines() if line.startswith("error:")]
        assert len(errors) == 1, outputs[0][-4000:]
        assert errors[0].startswith(f"error: cannot write checkpoint {checkpoints / ckpt.step_tag(3)}: No space left "
                                    "on device (ENOSPC"), errors[0]
        assert f"`latest` still names {ckpt.step_tag(2)}" in errors[0], errors[0]
        assert not any(line.startswith("error:") for line in outputs[1].splitlines()), outputs[1][-4000:]
        assert "Traceback" not in outputs[0] + outputs[1], outputs[0][-4000:] + outputs[1][-4000:]
        assert (checkpoints / "latest").read_text() == ckpt.step_tag(2)  # moved forward at resume, then kept
        assert ckpt.verify(checkpoints / ckpt.step_tag(2)) is None
        assert not (checkpoints / ckpt.step_tag(3)).exists()
        steps = [row["step"] for row in _rows(out) if "train/skipped_steps" in row]
        assert steps == [1, 2, 3], steps  # step 3 re-run and logged once
    finally:
        _unmount(checkpoints)


def test_a_run_whose_steps_are_all_skipped_stops_with_exit_3_and_exports_nothing(demo, tmp_path):
    out = tmp_path / "blowup"
    overrides = demo_overrides(demo, same_vocab=False, output_dir=out) + [
        "optim.lr=1.0e30", "optim.projector_lr=1.0e30", "optim.warmup_steps=0", "optim.max_steps=6",
        "optim.max_consecutive_skipped_steps=2", "checkpoint.every_steps=0", "log.tensorboard=false"]
    codes, outputs = _run_ranks(overrides, port=29574)
    assert codes == [3, 3], outputs[0][-4000:] + outputs[1][-4000:]
    errors = [line for line in outputs[0].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: the last 2 optimizer steps" in errors[0], outputs[0][-4000:]
    assert "optim.max_consecutive_skipped_steps=2" in errors[0] and "nothing exported" in errors[0]
    assert not any(line.startswith("error:") for line in outputs[1].splitlines())
    assert "Traceback" not in outputs[0] + outputs[1]
    assert not (out / "export").exists()
    rows = [row for row in _rows(out) if "train/skipped_steps" in row]
    assert rows[-1]["train/skipped_steps"] == 2 and rows[-1]["step"] < 6
