"""The alignment report's per-example coverage histogram: numbers (manifest, alignment_report.json), the SVG
picture, the text rendering, and the TensorBoard form."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
from dskd_scale.prealign.report import HISTOGRAM_FILE, REPORT_FILE, render_report
from dskd_scale.tb_logging import coverage_histogram, histogram_raw


@pytest.fixture(scope="module")
def prealigned(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    manifest = run_prealign(PrealignConfig(
        teacher_tokenizer=str(demo["teacher_tokenizer"]), student_tokenizer=str(demo["student_tokenizer"]),
        data=(str(demo["train"]),), out=str(out), max_length=96, num_shards=2, workers=1, chunk_examples=50))
    return out, manifest


def test_histogram_counts_every_example_by_its_coverage_read_back_from_the_shards(prealigned):
    out, manifest = prealigned
    expected = np.zeros(20, dtype=np.int64)
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        for labels, pairs in zip(table.column("student_labels").to_pylist(), table.column("align_student").to_pylist(),
                                 strict=True):
            response_tokens = sum(label != -100 for label in labels)
            coverage = Fraction(len(pairs), response_tokens)  # exact, from the definition
            expected[min(math.floor(coverage * 20), 19)] += 1
    histogram = manifest["stats"]["coverage_histogram"]
    assert histogram["counts"] == expected.tolist() and sum(histogram["counts"]) == manifest["stats"]["examples"]
    assert histogram["bin_edges"][0] == 0.0 and histogram["bin_edges"][-1] == 1.0 and len(histogram["bin_edges"]) == 21
    assert len(set(np.flatnonzero(expected).tolist())) > 1  # the demo spreads over several bins: a real check
    stored = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert stored["coverage_histogram"] == histogram


def test_the_picture_is_an_svg_bar_per_bin_and_the_text_report_shows_the_bins(prealigned):
    out, manifest = prealigned
    root = ElementTree.fromstring((out / HISTOGRAM_FILE).read_bytes())
    bars = [rect for rect in root.iter("{http://www.w3.org/2000/svg}rect") if rect.find(
        "{http://www.w3.org/2000/svg}title") is not None]
    counts = manifest["stats"]["coverage_histogram"]["counts"]
    assert [int(bar.find("{http://www.w3.org/2000/svg}title").text.rsplit(": ", 1)[1]) for bar in bars] == counts
    heights = [float(bar.get("height")) for bar in bars]
    assert heights[int(np.argmax(counts))] == max(heights) > 0
    text = render_report(manifest, out)
    assert "Examples by coverage" in text and "[0.95, 1.00] " in text and str(HISTOGRAM_FILE) in text


def test_tensorboard_form_matches_the_counts_and_is_accepted_by_summary_writer(prealigned, tmp_path):
    out, _ = prealigned
    histogram = coverage_histogram(out)
    raw = histogram_raw(histogram)
    assert raw["num"] == sum(histogram["counts"]) and raw["bucket_counts"] == histogram["counts"]
    assert raw["bucket_limits"] == histogram["bin_edges"][1:] and 0.0 <= raw["min"] < raw["max"] <= 1.0
    assert histogram_raw({"bin_edges": [0.0, 0.5, 1.0], "counts": [0, 0]}) is None
    hand = histogram_raw({"bin_edges": [0.0, 0.5, 1.0], "counts": [1, 3]})
    assert hand["min"] == 0.0 and hand["max"] == 1.0 and hand["sum"] == pytest.approx(0.25 + 3 * 0.75)
    assert hand["sum_squares"] == pytest.approx(0.0625 + 3 * 0.5625)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        writer.add_histogram_raw("prealign/coverage_per_example", global_step=0, **raw)
    assert any((tmp_path / "tb").iterdir())
