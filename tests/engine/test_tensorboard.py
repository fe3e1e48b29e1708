"""What a run writes to TensorBoard besides the training scalars: hyperparameters, the training data's alignment
coverage histogram, memory as the maximum over ranks (2-rank ZeRO-3 run, port 29560), and evaluation scores.

The reference values are computed here from their definitions (plain Python over the shard rows, a max over
per-rank values), not with the functions under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_helpers import check, demo_overrides, launch

ETA_CONFIG = "configs/tests/tiny_dskd_eta.yaml"


def read_events(folder: Path) -> dict[str, list]:
    """tag -> list of (step, summary value) over every event file of a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    tags: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():  # raw events, no conversion
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value))
    return tags


def scalar(value) -> float:
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") else float(value.simple_value)


def reference_coverage(data_dir: Path, bins: int = 20) -> dict:
    """From the definition, row by row: an example's coverage is aligned pairs / student response tokens (labels
    that are not -100); bin k holds [k/bins, (k+1)/bins) in integer arithmetic, the last bin also 1.0."""
    import pyarrow.parquet as pq

    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts, pairs_total, response_total, without = [0] * bins, 0, 0, 0
    for shard in manifest["shards"]:
        for row in pq.read_table(data_dir / shard["file"]).to_pylist():
            pairs = len(row["align_student"])
            response = sum(1 for label in row["student_labels"] if label != -100)
            counts[min(pairs * bins // max(response, 1), bins - 1)] += 1
            pairs_total, response_total, without = pairs_total + pairs, response_total + response, without + (not pairs)
    return {"counts": counts, "coverage": pairs_total / response_total, "examples_without_pairs": without}


def test_coverage_histogram_from_the_manifest_equals_the_one_from_the_shards(demo, tmp_path) -> None:
    import shutil

    from dskd_scale.tb_logging import coverage_histogram

    expected = reference_coverage(demo["eta"])
    assert sum(expected["counts"]) > 0
    from_manifest = coverage_histogram(demo["eta"])
    assert from_manifest["counts"] == expected["counts"]
    assert from_manifest["examples_without_pairs"] == expected["examples_without_pairs"]
    assert from_manifest["coverage"] == pytest.approx(expected["coverage"], abs=1e-6)  # the manifest rounds to 1e-6
    # A folder whose manifest has no histogram (written before it existed): computed from the shards.
    older = tmp_path / "older"
    shutil.copytree(demo["eta"], older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["stats"]["coverage_histogram"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    from_shards = coverage_histogram(older)
    assert from_shards["counts"] == expected["counts"]
    assert from_shards["bin_edges"] == from_manifest["bin_edges"]
    assert from_shards["coverage"] == pytest.approx(expected["coverage"], rel=1e-12)
    assert from_shards["examples_without_pairs"] == expected["examples_without_pairs"]


@pytest.mark.dist
@pytest.mark.e2e
def test_run_records_hparams_coverage_histogram_and_peak_memory(demo, tmp_path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    overrides = demo_overrides(demo, same_vocab=False, output_dir=out) + [
        "optim.max_steps=2", "optim.lr=3.0e-3", "checkpoint.every_steps=0", "checkpoint.export_at_end=false"]
    check(launch(ETA_CONFIG, overrides, ranks=2, port=29560))
    events = read_events(out / "tensorboard")

    # Hyperparameters: one session start holding the config's scalars (overrides included) and the world size.
    starts = events["_hparams_/session_start_info"]
    assert len(starts) == 1
    data = plugin_data_pb2.HParamsPluginData.FromString(starts[0][1].metadata.plugin_data.content)
    hparams = data.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(3.0e-3)
    assert hparams["kd.criterion"].string_value == "dskd_eta"
    assert hparams["run.world_size"].number_value == 2
    assert hparams["data.train_dir"].string_value == str(demo["eta"])
    assert "_hparams_/experiment" in events

    # Coverage histogram at step 0: the bucket counts of the training examples, as the definition gives them.
    expected = reference_coverage(demo["eta"])
    (step, histogram), = events["data/alignment_coverage"]
    assert step == 0
    assert histogram.histo.num == sum(expected["counts"]) > 0
    assert [int(count) for count in histogram.histo.bucket] == expected["counts"]
    assert list(histogram.histo.bucket_limit) == pytest.approx([k / 20 for k in range(1, 21)])
    (_, tokens), = events["data/alignment_coverage_tokens"]
    assert scalar(tokens) == pytest.approx(expected["coverage"], abs=1e-6)
    (_, without), = events["data/examples_without_pairs"]
    assert scalar(without) == expected["examples_without_pairs"]

    # Memory: logged every step as the peak over ranks, the same numbers as metrics.jsonl.
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in row}
    for tag in ("memory/rss_gb", "memory/peak_rss_gb"):
        logged = {step: scalar(value) for step, value in events[tag]}
        assert sorted(logged) == [1, 2]
        for step, value in logged.items():
            assert value == pytest.approx(rows[step][tag], rel=1e-6)
            assert 0.05 < value < 64, (tag, value)  # GiB of a tiny CPU rank: sane units


def _peak_worker(rank: int, world: int, port: int, out: str) -> None:
    from dskd_scale.metrics import MetricWindow

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        window = MetricWindow()
        for step in range(3):  # per rank and step: peak 10*rank + step, local value rank + 1
            window.add_peak("memory/x", 10.0 * rank + step)
            window.add_local("perf/y", rank + 1.0)
            window.add_global("train/z", 0.5)
            window.end_step()

        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(tensor)
            return tensor

        values = window.reduce(all_reduce_sum, world, torch.device("cpu"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_peak_metrics_are_the_maximum_over_ranks_and_steps(tmp_path) -> None:
    world = 3
    mp.spawn(_peak_worker, args=(world, 29561, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert values["memory/x"] == 10.0 * (world - 1) + 2  # max over ranks of max over steps
        assert values["perf/y"] == pytest.approx(sum(r + 1.0 for r in range(world)) / world)  # mean over ranks
        assert values["train/z"] == pytest.approx(0.5 * world)  # sum over ranks, mean over steps


def test_evaluation_scores_are_written_at_the_given_step(tmp_path) -> None:
    from dskd_scale.tb_logging import log_eval_scores

    results = {"suites": {"dolly": {"metrics": {"rougeL": 23.5, "rougeL_std": 0.25}},
                          "gsm8k": {"metrics": {"accuracy": 41.0}}}}
    log_eval_scores(tmp_path, results, step=1200)
    events = read_events(tmp_path)
    assert {tag: [(step, scalar(v)) for step, v in values] for tag, values in events.items()} == {
        "eval_scores/dolly/rougeL": [(1200, 23.5)], "eval_scores/dolly/rougeL_std": [(1200, 0.25)],
        "eval_scores/gsm8k/accuracy": [(1200, 41.0)]}
