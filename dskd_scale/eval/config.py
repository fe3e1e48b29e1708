"""Typed evaluation config (``tools/evaluate.py`` flags and ``configs/eval/*.yaml`` map onto it).

Suites and where their data lives by default, relative to ``data_dir`` (the layout of the DSKD/MiniLLM data:
``dolly/valid.jsonl``, ``gsm8k/test.jsonl``, ``humaneval/HumanEval.jsonl.gz``, ...). ``data_paths.<suite>``
overrides one file; an unknown suite name with a path in ``data_paths`` is evaluated as an instruction-following
set (prompt/output JSONL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

INSTRUCTION_SUITES = {
    "dolly": "dolly/valid.jsonl",
    "self-inst": "self-inst/valid.jsonl",
    "vicuna": "vicuna/valid.jsonl",
    "sinst": "sinst/11_/valid.jsonl",
    "uinst": "uinst/11_/valid.jsonl",
}
MATH_SUITES = {"gsm8k": "gsm8k/test.jsonl"}
GSM8K_TRAIN = "gsm8k/train.jsonl"
CODE_SUITES = {"humaneval": "humaneval/HumanEval.jsonl.gz", "mbpp": "mbpp/sanitized-mbpp.json"}
KNOWN_SUITES = {**INSTRUCTION_SUITES, **MATH_SUITES, **CODE_SUITES}


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
    """Decoding of the instruction-following suites; the defaults are the paper's (anchor evaluate_main)."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    repetition_penalty: float = 1.0

    def validate(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (use greedy: true for argmax decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            problems.append("top_k and no_repeat_ngram_size must be >= 0 (0 turns them off)")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeExecutionConfig:
    """Sandbox limits for HumanEval/MBPP programs; ``python`` is the interpreter programs run with.

    ``allow_unsandboxed``: where the machine offers neither user namespaces nor root (see
    ``dskd_scale.eval.execution``), run model-written code WITHOUT containment instead of refusing to start.
    """

    timeout_s: float = 10.0
    memory_mb: int = 2048
    workers: int = 4
    python: str | None = None
    allow_unsandboxed: bool = False

    def validate(self) -> list[str]:
        problems = []
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            problems.append(f"memory_mb must be >= 64, got {self.memory_mb}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """One evaluation run of one model folder over several suites."""

    model: str
    tokenizer: str | None = None
    out: str = "results.json"
    suites: tuple[str, ...] = ("dolly", "self-inst", "vicuna")
    data_dir: str | None = None
    data_paths: dict[str, str] = field(default_factory=dict)
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    limit: int | None = None
    suite_limits: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gsm8k_shots: int = 5
    mbpp_shots: int = 3
    use_chat_template: bool = False
    on_bad_row: Literal["error", "skip"] = "error"
    code_execution: CodeExecutionConfig = field(default_factory=CodeExecutionConfig)

    def validate(self) -> list[str]:
        problems = []
        if not self.suites:
            problems.append("suites must name at least one suite")
        for suite in self.suites:
            if suite not in KNOWN_SUITES and suite not in self.data_paths:
                problems.append(
                    f"suites has unknown suite '{suite}'; known: {', '.join(KNOWN_SUITES)} "
                    "(or give its file in data_paths to evaluate it as instruction following)"
                )
            elif suite not in self.data_paths and self.data_dir is None:
                problems.append(f"data_dir is required to find suite '{suite}' (or set data_paths.{suite})")
        if not self.seeds:
            problems.append("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct, got {list(self.seeds)}")
        for name in ("max_new_tokens", "max_prompt_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 when set, got {value}")
        for suite, value in self.suite_limits.items():
            if suite not in self.suites:
                problems.append(f"suite_limits.{suite} names a suite that is not in suites {list(self.suites)}")
            elif value < 1:
                problems.append(f"suite_limits.{suite} must be >= 1, got {value}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.gsm8k_shots < 0 or self.mbpp_shots < 0:
            problems.append("gsm8k_shots and mbpp_shots must be >= 0")
        return problems

    def data_path(self, suite: str) -> str:
        """The data file of ``suite`` (explicit ``data_paths`` entry first, then the default layout)."""
        if suite in self.data_paths:
            return self.data_paths[suite]
        return f"{self.data_dir}/{KNOWN_SUITES[suite]}"

    def limit_for(self, suite: str) -> int | None:
        """How many examples of ``suite`` to evaluate (``suite_limits`` first, then ``limit``; None = all)."""
        return self.suite_limits.get(suite, self.limit)

    def suite_kind(self, suite: str) -> str:
        if suite in MATH_SUITES:
            return "math"
        if suite in CODE_SUITES:
            return "code"
        return "instruction"
