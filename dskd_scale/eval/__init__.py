"""Evaluation the way the DSKD papers report it, for any Hugging Face causal-LM folder.

In-process API (used by ``tools/evaluate.py`` and the demo)::

    from dskd_scale.eval import load_model_and_tokenizer, evaluate_instruction_following
    model, tokenizer, _ = load_model_and_tokenizer("runs/x/export", dtype="fp32", device="cpu")
    result = evaluate_instruction_following(model, tokenizer, [{"prompt": ..., "output": ...}], greedy=True)
    result["metrics"]  # {"rougeL", "rougeL_std", "exact_match", "exact_match_std"}

Modules: ``metrics`` (ROUGE-L, exact match), ``answers`` (GSM8K numbers), ``execution`` (sandboxed code runs),
``data`` (suite loaders), ``prompts``, ``sampling`` (batch-invariant keyed sampling), ``generation``,
``distributed`` (torch.distributed sharding), ``suites``, ``results``, ``runner`` (``run_evaluation``).
Importing this package does not import transformers; the functions below import it lazily.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "rouge_l": "metrics", "exact_match": "metrics", "text_metrics": "metrics",
    "extract_final_number": "answers",
    "SandboxLimits": "execution", "run_program": "execution", "run_programs": "execution",
    "EvalExample": "data", "DataError": "data",
    "EvalConfig": "config", "SamplingConfig": "config",
    "load_model_and_tokenizer": "loading",
    "evaluate_instruction_following": "suites", "evaluate_gsm8k": "suites", "evaluate_code": "suites",
    "run_evaluation": "runner",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dskd_scale.eval' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"dskd_scale.eval.{_EXPORTS[name]}"), name)
