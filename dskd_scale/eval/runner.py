"""``run_evaluation(EvalConfig)``: load the model once, run every suite, write results.json and the records.

Runs the same under one process or a launcher (torchrun / deepspeed / srun): every rank loads the model and
generates its share; rank 0 writes ``config.out``, the per-example JSONL under ``<out stem>_records/`` and prints
the table. Suite defaults: instruction following samples as the paper (5 seeds unless ``sampling.greedy``), 256
new tokens; GSM8K and code decode greedily, 256 / 512 new tokens. ``max_new_tokens`` overrides all of them.
"""

from __future__ import annotations

import time
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


def _run_suite(config: EvalConfig, suite: str, model, tokenizer, records_dir: Path) -> tuple[dict[str, Any], list]:
    kind = config.suite_kind(suite)
    path = config.data_path(suite)
    common = {
        "max_new_tokens": config.max_new_tokens or DEFAULT_NEW_TOKENS[kind], "batch_size": config.batch_size,
        "max_prompt_tokens": config.max_prompt_tokens, "records_dir": records_dir, "name": suite,
    }  # fmt: skip
    if kind == "instruction":
        loaded = D.load_instruction_suite(path, on_bad_row=config.on_bad_row, limit=config.limit)
        result = evaluate_instruction_following(
            model, tokenizer, loaded.examples, seeds=config.seeds, sampling=config.sampling, **common
        )
    elif kind == "math":
        loaded = D.load_gsm8k(path, on_bad_row=config.on_bad_row, limit=config.limit)
        result = evaluate_gsm8k(
            model, tokenizer, loaded.examples, shots=_gsm8k_shots(config), use_chat_template=config.use_chat_template,
            **common,
        )  # fmt: skip
    else:
        if suite == "mbpp":
            loaded, shots = D.load_mbpp(path, on_bad_row=config.on_bad_row, limit=config.limit)
            shots = shots[: config.mbpp_shots]
        else:
            loaded, shots = D.load_humaneval(path, on_bad_row=config.on_bad_row, limit=config.limit), []
        execution = config.code_execution
        limits = SandboxLimits(timeout_s=execution.timeout_s, memory_bytes=execution.memory_mb * 1024**2)
        result = evaluate_code(
            model, tokenizer, loaded.examples, task=suite, shots=shots, use_chat_template=config.use_chat_template,
            limits=limits, workers=execution.workers, **common,
        )  # fmt: skip
    result["data"] = {"path": str(path), "sha256": file_sha256(path)}
    return result, loaded.skipped


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.model`` on ``config.suites``; returns the results dict (the same on every rank)."""
    started = time.perf_counter()
    context = init_from_env()
    model, tokenizer, notes = load_model_and_tokenizer(
        config.model, dtype=config.dtype, device=config.device, context=context
    )
    records_dir = records_dir_for(config.out)
    config_dict = config_to_dict(config)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "model": {
            "path": str(Path(config.model).resolve()),
            "config_sha256": file_sha256(Path(config.model) / "config.json"),
            **notes,
        },
        "config": config_dict,
        "config_sha256": sha256_of_json(config_dict),
        "suites": {},
        "skipped_rows": {},
        "records_dir": str(records_dir),
        "world_size": context.world_size,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for suite in config.suites:
        suite_result, skipped = _run_suite(config, suite, model, tokenizer, records_dir)
        results["suites"][suite] = suite_result
        if skipped:
            results["skipped_rows"][suite] = skipped
            log.warning("%s: skipped %d malformed row(s), first: %s", suite, len(skipped), skipped[0])
    results["duration_s"] = round(time.perf_counter() - started, 3)
    if context.is_main:
        write_results(results, config.out)
        print(format_table(results), flush=True)
        log.info("wrote %s and per-example records under %s", config.out, records_dir)
    barrier(context)
    return results
