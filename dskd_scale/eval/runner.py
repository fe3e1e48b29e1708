"""``run_evaluation(EvalConfig)``: load the model once, run every suite, write results.json and the records.

Runs the same under one process or a launcher (torchrun / deepspeed / srun): every rank loads the model and
generates its share; rank 0 writes ``config.out``, the per-example JSONL under ``<out stem>_records/`` and prints
the table. Suite defaults: instruction following samples as the paper (5 seeds unless ``sampling.greedy``), 256
new tokens; GSM8K and code decode greedily, 256 / 512 new tokens. ``max_new_tokens`` overrides all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dskd_scale.config.loader import config_to_dict
from dskd_scale.eval import data as D
from dskd_scale.eval.config import GSM8K_TRAIN, EvalConfig
from dskd_scale.eval.distributed import barrier, init_from_env
from dskd_scale.eval.execution import SandboxLimits
from dskd_scale.eval.loading import load_model_and_tokenizer
from dskd_scale.eval.results import (
    RESULTS_FORMAT,
    RESULTS_FORMAT_VERSION,
    file_sha256,
    format_table,
    sha256_of_json,
    write_results,
)
from dskd_scale.eval.suites import evaluate_code, evaluate_gsm8k, evaluate_instruction_following
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)
DEFAULT_NEW_TOKENS = {"instruction": 256, "math": 256, "code": 512}


# Settings that say which model runs where, not how it is evaluated (keyed sampling makes batching irrelevant).
_NOT_PROTOCOL = ("model", "tokenizer", "out", "device", "batch_size")


def protocol_of(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that defines the evaluation protocol (equal hash = comparable numbers)."""
    protocol = {k: v for k, v in config_dict.items() if k not in _NOT_PROTOCOL}
    protocol["code_execution"] = {
        k: v for k, v in config_dict["code_execution"].items() if k not in ("workers", "allow_unsandboxed")
    }
    return protocol


def records_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_records")


def _gsm8k_shots(config: EvalConfig) -> list[D.EvalExample]:
    if config.gsm8k_shots == 0 or config.use_chat_template:
        return []
    train = config.data_paths.get("gsm8k_train") or (f"{config.data_dir}/{GSM8K_TRAIN}" if config.data_dir else None)
    if train is None:
        raise ValueError("gsm8k_shots > 0 needs the GSM8K train file: set data_dir or data_paths.gsm8k_train")
    return D.load_gsm8k(train, limit=config.gsm8k_shots).examples


@dataclass(slots=True)
class SuiteData:
    """A suite's examples (and few-shot examples), loaded before the model so bad data fails fast."""

    name: str
    kind: str
    path: str
    loaded: D.LoadedSuite
    shots: list[D.EvalExample]


def load_suite_data(config: EvalConfig, suite: str) -> SuiteData:
    kind, path = config.suite_kind(suite), config.data_path(suite)
    options = {"on_bad_row": config.on_bad_row, "limit": config.limit_for(suite)}
    shots: list[D.EvalExample] = []
    if kind == "instruction":
        loaded = D.load_instruction_suite(path, **options)
    elif kind == "math":
        loaded, shots = D.load_gsm8k(path, **options), _gsm8k_shots(config)
    elif suite == "mbpp":
        loaded, shots = D.load_mbpp(path, **options)
        shots = shots[: config.mbpp_shots]
    else:
        loaded = D.load_humaneval(path, **options)
    return SuiteData(suite, kind, str(path), loaded, shots)


def _run_suite(config: EvalConfig, data: SuiteData, model, tokenizer, records_dir: Path) -> dict[str, Any]:
    common = {
        "max_new_tokens": config.max_new_tokens or DEFAULT_NEW_TOKENS[data.kind], "batch_size": config.batch_size,
        "max_prompt_tokens": config.max_prompt_tokens, "records_dir": records_dir, "name": data.name,
    }  # fmt: skip
    examples = data.loaded.examples
    if data.kind == "instruction":
        result = evaluate_instruction_following(
            model, tokenizer, examples, seeds=config.seeds, sampling=config.sampling, **common
        )
    elif data.kind == "math":
        result = evaluate_gsm8k(
            model, tokenizer, examples, shots=data.shots, use_chat_template=config.use_chat_template, **common
        )
    else:
        execution = config.code_execution
        limits = SandboxLimits(timeout_s=execution.timeout_s, memory_bytes=execution.memory_mb * 1024**2)
        result = evaluate_code(
            model, tokenizer, examples, task=data.name, shots=data.shots, use_chat_template=config.use_chat_template,
            limits=limits, workers=execution.workers, python=execution.python,
            allow_unsandboxed=execution.allow_unsandboxed, **common,
        )  # fmt: skip
    result["data"] = {"path": data.path, "sha256": file_sha256(data.path)}
    return result


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.model`` on ``config.suites``; returns the results dict (the same on every rank)."""
    started = time.perf_counter()
    context = init_from_env()
    suites = [load_suite_data(config, suite) for suite in config.suites]
    model, tokenizer, notes = load_model_and_tokenizer(
        config.model, tokenizer_dir=config.tokenizer, dtype=config.dtype, device=config.device, context=context
    )
    records_dir = records_dir_for(config.out)
    config_dict = config_to_dict(config)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "model": {
            "path": str(Path(config.model).resolve()),
            "config_sha256": file_sha256(Path(config.model) / "config.json"),
            "weights": {p.name: p.stat().st_size for p in sorted(Path(config.model).glob("*.safetensors"))}
            or {p.name: p.stat().st_size for p in sorted(Path(config.model).glob("*.bin"))},
            **notes,
        },
        "config": config_dict,
        "config_sha256": sha256_of_json(config_dict),
        "protocol_sha256": sha256_of_json(protocol_of(config_dict)),
        "suites": {},
        "skipped_rows": {},
        "records_dir": str(records_dir),
        "world_size": context.world_size,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for data in suites:
        suite_started = time.perf_counter()
        results["suites"][data.name] = _run_suite(config, data, model, tokenizer, records_dir)
        results["suites"][data.name]["duration_s"] = round(time.perf_counter() - suite_started, 3)
        if data.loaded.skipped:
            results["skipped_rows"][data.name] = data.loaded.skipped
            log.warning("%s: skipped %d malformed row(s), first: %s", data.name, len(data.loaded.skipped),
                        data.loaded.skipped[0])
    results["duration_s"] = round(time.perf_counter() - started, 3)
    if context.is_main:
        write_results(results, config.out)
        print(format_table(results), flush=True)
        log.info("wrote %s and per-example records under %s", config.out, records_dir)
    barrier(context)
    return results
