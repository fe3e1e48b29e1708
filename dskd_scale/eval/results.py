"""``results.json``: per-suite scores with everything needed to trace them, plus printed tables.

Layout (``format`` = ``dskd_scale.eval_results``, ``format_version`` = 1)::

    model:   {path, config_sha256, weights (file sizes), dtype, device, pad_token}
    config:  the resolved EvalConfig;  config_sha256: hash of it (canonical JSON)
    protocol_sha256: hash of the config without model/out/device/batching: equal means comparable numbers
    suites:  {name: {kind, metrics, runs, num_examples, decoding, generation, [sandbox]}}
    skipped_rows: {name: ["file:line: reason", ...]};  records_dir: per-example JSONL folder
    world_size, started, duration_s

Each suite has one headline metric (instruction: rougeL, math: accuracy, code: pass@1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "dskd_scale.eval_results"
RESULTS_FORMAT_VERSION = 1
HEADLINE = {"instruction": "rougeL", "math": "accuracy", "code": "pass@1"}


def sha256_of_json(data: Any) -> str:
    """Hash of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write_results(results: Mapping[str, Any], path: str | Path) -> None:
    """Write atomically, so an interrupted run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a results file; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"results file not found: {path}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path}: not a dskd_scale results file (format != {RESULTS_FORMAT!r})")
    if data.get("format_version") != RESULTS_FORMAT_VERSION:
        version = data.get("format_version")
        raise ValueError(f"{path}: results format_version {version}, expected {RESULTS_FORMAT_VERSION}")
    return data


def _cell(metrics: Mapping[str, float], name: str) -> str:
    if name not in metrics:
        return "-"
    std = metrics.get(f"{name}_std", 0.0)
    return f"{metrics[name]:.2f} ± {std:.2f}" if std else f"{metrics[name]:.2f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                   enumerate(zip(cells, widths, strict=True)))  # fmt: skip
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _metric_names(suite: Mapping[str, Any]) -> list[str]:
    return [name for name in suite["metrics"] if not name.endswith("_std")]


def instruction_suites(results: Mapping[str, Any]) -> list[str]:
    return [name for name, suite in results["suites"].items() if suite["kind"] == "instruction"]


def instruction_average(results: Mapping[str, Any], suites: Sequence[str] | None = None) -> float | None:
    """Mean ROUGE-L over the instruction-following suites (the papers' "Avg" column), if there are any."""
    names = instruction_suites(results) if suites is None else suites
    values = [results["suites"][name]["metrics"]["rougeL"] for name in names]
    return sum(values) / len(values) if values else None


def format_table(results: Mapping[str, Any]) -> str:
    """suite × metric table of one results dict (mean ± std over seeds where sampled)."""
    rows = []
    for name, suite in results["suites"].items():
        runs = ",".join(suite["runs"])
        for metric in _metric_names(suite):
            rows.append([name, metric, _cell(suite["metrics"], metric), str(suite["num_examples"]), runs])
    average = instruction_average(results)
    if average is not None:
        rows.append(["avg(instruction)", "rougeL", f"{average:.2f}", "", ""])
    return _render(["suite", "metric", "score", "n", "runs"], rows)


def compare_table(results_list: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Side-by-side table of several results (e.g. SFT vs DSKD), with the difference to the first column."""
    suites: dict[str, list[str]] = {}
    for results in results_list:
        for name, suite in results["suites"].items():
            names = suites.setdefault(name, [])
            names.extend(m for m in _metric_names(suite) if m not in names)
    header = ["suite", "metric", *labels] + [f"Δ {label}" for label in labels[1:]]
    rows = []
    for name, metrics in suites.items():
        for metric in metrics:
            values = [r["suites"].get(name, {}).get("metrics", {}) for r in results_list]
            deltas = [
                f"{v[metric] - values[0][metric]:+.2f}" if metric in v and metric in values[0] else "-"
                for v in values[1:]
            ]
            rows.append([name, metric, *(_cell(v, metric) for v in values), *deltas])
    # The average only means something over the same suites: take those every file has.
    common = [name for name in instruction_suites(results_list[0]) if all(name in r["suites"] for r in results_list)]
    if common:
        averages = [instruction_average(r, common) for r in results_list]
        deltas = [f"{a - averages[0]:+.2f}" for a in averages[1:]]
        rows.append([f"avg({','.join(common)})", "rougeL", *(f"{a:.2f}" for a in averages), *deltas])
    return _render(header, rows)


def comparability_notes(results_list: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    """Warnings where the compared runs used different examples counts or decoding for the same suite."""
    notes = []
    first = results_list[0]
    for label, results in zip(labels[1:], results_list[1:], strict=True):
        if results.get("protocol_sha256") != first.get("protocol_sha256"):
            notes.append(f"{label} was evaluated under a different protocol (config) than {labels[0]}")
        for name, suite in results["suites"].items():
            reference = first["suites"].get(name)
            if reference is None:
                continue
            if suite["num_examples"] != reference["num_examples"]:
                notes.append(f"{name}: {label} has {suite['num_examples']} examples, {labels[0]} "
                             f"{reference['num_examples']}")
            if suite["decoding"] != reference["decoding"]:
                notes.append(f"{name}: {label} used different decoding settings than {labels[0]}")
    return notes
