"""What TensorBoard gets besides the training scalars: the run's hyperparameters, the alignment coverage of the
training data, and evaluation scores (``tools/evaluate.py --tensorboard``).

Tags written here:

- hparams (HParams dashboard): every scalar of the run config as a dotted key (``optim.lr``, ``kd.criterion``)
  plus ``run.world_size``, linked to the ``train/loss`` and ``eval/loss`` scalars;
- ``data/alignment_coverage`` (histogram, step 0): per training example, aligned token pairs over student
  response tokens (the alignment report's histogram, from the prealigned folder's manifest);
  ``data/alignment_coverage_tokens`` (the same over all tokens) and ``data/examples_without_pairs`` beside it;
- ``eval_scores/<suite>/<metric>`` (+ ``_std`` over sampling seeds) at the step of the evaluated checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dskd_scale.data.format import IGNORE_INDEX, read_manifest
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)

COVERAGE_TAG = "data/alignment_coverage"
COVERAGE_BINS = 20  # 5 % buckets, as the alignment report (tools/prealign.py) draws them
HPARAM_METRICS = ("train/loss", "eval/loss")


def log_run_start(writer, config: Mapping[str, Any], *, world_size: int, train_dir: str | Path) -> None:
    """Once at the start of training (rank 0): hyperparameters and the training data's alignment coverage."""
    log_hparams(writer, config, world_size=world_size)
    try:
        histogram = log_alignment_coverage(writer, train_dir)
    except (OSError, KeyError, ValueError) as error:  # not a prealigned folder (ShardFormatError is a ValueError)
        log.info("no alignment coverage histogram for %s: %s", train_dir, error)
        return
    log.info("alignment coverage of the %d training examples: %.3f of student response tokens, %d examples without "
             "any aligned pair (TensorBoard %s)", sum(histogram["counts"]), histogram["coverage"],
             histogram["examples_without_pairs"], COVERAGE_TAG)


def scalar_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Flatten a config dict to the scalar leaves TensorBoard's hparams accept (lists and None are left out)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(scalar_hparams(value, prefix=f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
    return flat


def log_hparams(writer, config: Mapping[str, Any], *, world_size: int) -> None:
    """Record the run's hyperparameters once, in the run's own event file (not a sub-run as ``add_hparams`` does)."""
    from torch.utils.tensorboard.summary import hparams

    values = {**scalar_hparams(config), "run.world_size": world_size}
    experiment, session_start, session_end = hparams(values, {tag: 0.0 for tag in HPARAM_METRICS})
    file_writer = writer._get_file_writer()
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)


def coverage_histogram(data_dir: str | Path, bins: int = COVERAGE_BINS) -> dict[str, Any]:
    """The per-example coverage histogram of a prealigned folder and its token-weighted coverage.

    Returns ``{"bin_edges": [bins+1], "counts": [bins], "coverage": aligned pairs / student response tokens,
    "examples_without_pairs": int}``. Taken from the manifest (``stats.coverage_histogram``, written by
    tools/prealign.py beside the alignment report), else computed from the shards' ``align_student`` and
    ``student_labels`` columns in bounded batches. An example's bin is ``pairs * bins // response tokens`` (integers,
    so no float rounding at the edges); bin k is [k/bins, (k+1)/bins), the last bin also holds 1.0.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    stats = manifest["stats"]
    stored = stats.get("coverage_histogram")
    if stored is not None:
        return {"bin_edges": list(stored["bin_edges"]), "counts": list(stored["counts"]),
                "coverage": float(stats["coverage"]), "examples_without_pairs": int(stats["examples_without_pairs"])}
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = np.zeros(bins, dtype=np.int64)
    pairs_total = response_total = without_pairs = 0
    for shard in manifest["shards"]:
        parquet = pq.ParquetFile(data_dir / shard["file"])
        for batch in parquet.iter_batches(batch_size=8192, columns=["align_student", "student_labels"]):
            pairs = pc.list_value_length(batch.column("align_student")).to_numpy(zero_copy_only=False)
            labels = batch.column("student_labels")  # offsets index into .values, also for a sliced array
            is_response = labels.values.to_numpy(zero_copy_only=False) != IGNORE_INDEX
            response_before = np.concatenate([[0], np.cumsum(is_response, dtype=np.int64)])
            offsets = labels.offsets.to_numpy(zero_copy_only=False)
            response = response_before[offsets[1:]] - response_before[offsets[:-1]]
            counts += np.bincount(np.minimum(pairs * bins // np.maximum(response, 1), bins - 1), minlength=bins)
            pairs_total += int(pairs.sum())
            response_total += int(response.sum())
            without_pairs += int((pairs == 0).sum())
    return {"bin_edges": [round(k / bins, 6) for k in range(bins + 1)], "counts": counts.tolist(),
            "coverage": pairs_total / response_total if response_total else 0.0,
            "examples_without_pairs": without_pairs}


def histogram_raw(histogram: Mapping[str, Any]) -> dict[str, Any] | None:
    """Keyword arguments of ``SummaryWriter.add_histogram_raw`` for a coverage histogram (None when it is empty).

    Only bin counts are known, so ``min``/``max`` are the outer edges of the non-empty bins and ``sum`` /
    ``sum_squares`` use bin midpoints (what TensorBoard draws is the bins, which are exact).
    """
    edges, counts = histogram["bin_edges"], list(histogram["counts"])
    filled = [k for k, count in enumerate(counts) if count]
    if not filled:
        return None
    middles = [(edges[k] + edges[k + 1]) / 2 for k in range(len(counts))]
    return {
        "min": edges[filled[0]], "max": edges[filled[-1] + 1], "num": sum(counts),
        "sum": sum(m * c for m, c in zip(middles, counts, strict=True)),
        "sum_squares": sum(m * m * c for m, c in zip(middles, counts, strict=True)),
        "bucket_limits": edges[1:], "bucket_counts": counts,
    }


def log_alignment_coverage(writer, data_dir: str | Path, step: int = 0) -> dict[str, Any]:
    """``data/alignment_coverage`` (histogram over examples), ``data/alignment_coverage_tokens`` (token-weighted)
    and ``data/examples_without_pairs`` of the training data; returns the histogram dict."""
    histogram = coverage_histogram(data_dir)
    raw = histogram_raw(histogram)
    if raw is not None:
        writer.add_histogram_raw(COVERAGE_TAG, global_step=step, **raw)
    writer.add_scalar(f"{COVERAGE_TAG}_tokens", histogram["coverage"], step)
    writer.add_scalar("data/examples_without_pairs", histogram["examples_without_pairs"], step)
    return histogram


def eval_score_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """``tools/evaluate.py`` results -> ``eval_scores/<suite>/<metric>`` values (``_std`` kept as its own tag)."""
    return {f"eval_scores/{suite}/{metric}": float(value)
            for suite, entry in results["suites"].items() for metric, value in entry["metrics"].items()}


def log_eval_scores(log_dir: str | Path, results: Mapping[str, Any], step: int) -> dict[str, float]:
    """Append the scores of one evaluation to a TensorBoard folder (e.g. ``<output_dir>/tensorboard``)."""
    from torch.utils.tensorboard import SummaryWriter

    scalars = eval_score_scalars(results)
    writer = SummaryWriter(str(log_dir))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return scalars
