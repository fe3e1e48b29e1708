"""Prealignment progress: one display for the whole run, plain periodic lines when stderr is not a terminal."""

from __future__ import annotations

import io

from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
from dskd_scale.utils.logging import ProgressLines


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_print_every_interval_with_rate_and_eta() -> None:
    clock, stream = _Clock(), io.StringIO()
    lines = ProgressLines(1000, desc="prealign", unit="examples", interval_s=30.0, stream=stream, clock=clock)
    clock.now += 10.0
    lines.update(100)  # 10 s < 30 s: nothing yet
    assert stream.getvalue() == ""
    clock.now += 30.0
    lines.update(300)  # 400 done in 40 s: 10/s, 600 left -> 60 s
    clock.now += 5.0
    lines.update(50)  # 5 s after the last line: nothing
    lines.close()
    lines.close()  # closing twice prints once
    printed = stream.getvalue().splitlines()
    assert len(printed) == 2 and "\r" not in stream.getvalue()
    assert printed[0].endswith("prealign: 400/1000 examples (40.0%), 10.0 examples/s, elapsed 0:00:40, ETA 0:01:00")
    assert printed[1].endswith("prealign: 450/1000 examples (45.0%), 10.0 examples/s, elapsed 0:00:45, ETA 0:00:55")


def test_a_run_over_three_shards_reports_one_overall_progress_in_plain_lines(demo, tmp_path, capsys) -> None:
    config = PrealignConfig(teacher_tokenizer=str(demo["teacher_tokenizer"]),
                            student_tokenizer=str(demo["student_tokenizer"]), data=(str(demo["train"]),),
                            out=str(tmp_path / "out"), max_length=96, num_shards=3, workers=1, chunk_examples=50)
    run_prealign(config)
    stderr = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in stderr
    progress = [line for line in stderr.splitlines() if "prealign: 3 shard(s) of rank 0:" in line]
    assert len(progress) == 1, stderr  # a short run prints only the closing line, for all shards together
    assert "400/400 examples (100.0%)" in progress[0]
