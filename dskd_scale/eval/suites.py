"""The evaluation suites as in-process functions: instruction following (ROUGE-L, exact match), GSM8K, code.

Each function takes a loaded model and tokenizer (``loading.load_model_and_tokenizer``), examples, and decoding
settings, and returns a plain dict: ``metrics`` (means over runs, with ``<name>_std`` the sample standard deviation
over seeds), ``runs`` (metrics per seed, or ``greedy``), ``num_examples``, ``decoding`` and ``generation`` stats
(empty generations, truncated prompts, finish reasons). Under torch.distributed every rank generates and scores
a disjoint share of the batches; records are gathered so every rank returns the same dict. With ``records_dir``,
rank 0 writes one JSONL per run: prompt, generation, reference and score of every example, in dataset order.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dskd_scale.eval import prompts as P
from dskd_scale.eval.answers import extract_final_number
from dskd_scale.eval.config import SamplingConfig
from dskd_scale.eval.data import EvalExample, as_examples
from dskd_scale.eval.distributed import current_context, gather_records
from dskd_scale.eval.execution import SandboxLimits, detect_isolation, run_programs
from dskd_scale.eval.generation import GREEDY, Generation, generate_shard
from dskd_scale.eval.loading import context_window
from dskd_scale.eval.metrics import exact_match, rouge_l
from dskd_scale.eval.sandbox_tasks import humaneval_task, mbpp_task

PAPER_SAMPLING = SamplingConfig()
Scorer = Callable[[list[EvalExample], list[Generation]], list[dict[str, Any]]]


def _runs(seeds: Sequence[int] | None, sampling: SamplingConfig) -> list[tuple[str, int]]:
    """(label, seed) per run: one run per seed when sampling, a single ``greedy`` run otherwise."""
    if sampling.greedy or not seeds:
        return [("greedy", 0)]
    return [(str(seed), seed) for seed in seeds]


def _prompt_budget(model, max_new_tokens: int, max_prompt_tokens: int | None) -> int:
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    window = context_window(model)
    if window is None:
        return 2048
    if window <= max_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the {window}-token context")
    return window - max_new_tokens


def _evaluate(
    model, tokenizer, examples: list[EvalExample], prompts: list[str], *, name: str, kind: str, scorer: Scorer,
    metric_names: Sequence[str], sampling: SamplingConfig, seeds: Sequence[int] | None, max_new_tokens: int,
    max_prompt_tokens: int | None, batch_size: int, stop_strings: Sequence[str], records_dir: str | Path | None,
) -> dict[str, Any]:  # fmt: skip
    if not examples:
        raise ValueError(f"{name}: no examples to evaluate")
    context = current_context()
    budget = _prompt_budget(model, max_new_tokens, max_prompt_tokens)
    keys = [example.index for example in examples]
    runs: dict[str, dict[str, float]] = {}
    stats: Counter = Counter()
    rank_counts = [0] * context.world_size
    for label, seed in _runs(seeds, sampling):
        generations = generate_shard(
            model, tokenizer, prompts, keys, sampling=sampling, seed=seed, max_new_tokens=max_new_tokens,
            max_prompt_tokens=budget, batch_size=batch_size, stop_strings=stop_strings, context=context,
            desc=f"{name} [{label}]",
        )  # fmt: skip
        positions = sorted(generations)
        scores = scorer([examples[p] for p in positions], [generations[p] for p in positions])
        records = [
            {
                "position": p, "index": examples[p].index, "source": examples[p].source, "prompt": prompts[p],
                "generation": generations[p].text, "reference": examples[p].reference, **score,
                "finish": generations[p].finish, "new_tokens": generations[p].new_tokens,
                "prompt_truncated": generations[p].prompt_truncated, "rank": context.rank,
            }
            for p, score in zip(positions, scores, strict=True)
        ]  # fmt: skip
        records = gather_records(records, context)
        runs[label] = {metric: statistics.fmean(r[metric] for r in records) for metric in metric_names}
        stats.update(f"finish_{r['finish']}" for r in records)
        stats["empty_generations"] += sum(not r["generation"].strip() for r in records)
        stats["truncated_prompts"] += sum(r["prompt_truncated"] for r in records)
        stats["new_tokens"] += sum(r["new_tokens"] for r in records)
        stats.update(f"execution_{r['execution']}" for r in records if "execution" in r)
        for rank, count in Counter(r["rank"] for r in records).items():
            rank_counts[rank] += count
        if records_dir is not None and context.is_main:
            _write_records(Path(records_dir) / f"{name}.{label}.jsonl", records)
    metrics: dict[str, float] = {}
    for metric in metric_names:
        values = [run[metric] for run in runs.values()]
        metrics[metric] = statistics.fmean(values)
        metrics[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    total = len(examples) * len(runs)
    generation = {key: stats[key] for key in sorted(stats) if key != "new_tokens"}
    generation["mean_new_tokens"] = stats["new_tokens"] / total
    generation["examples_per_rank"] = rank_counts  # generations made by each rank, over all runs
    decoding = {**dataclasses.asdict(sampling), "seeds": [int(label) for label in runs if label != "greedy"],
                "max_new_tokens": max_new_tokens, "max_prompt_tokens": budget, "stop_strings": list(stop_strings)}
    return {"kind": kind, "metrics": metrics, "runs": runs, "num_examples": len(examples), "decoding": decoding,
            "generation": generation}


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            traced = {k: v for k, v in record.items() if k not in ("position", "rank")}
            handle.write(json.dumps(traced, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _text_scores(examples: list[EvalExample], generations: list[Generation]) -> list[dict[str, Any]]:
    return [
        {"rougeL": rouge_l(g.text, e.reference), "exact_match": exact_match(g.text, e.reference)}
        for e, g in zip(examples, generations, strict=True)
    ]


def evaluate_instruction_following(
    model, tokenizer, examples: Sequence[EvalExample | Mapping[str, Any]], *,
    seeds: Sequence[int] = (10, 20, 30, 40, 50), greedy: bool = False, max_new_tokens: int = 256,
    batch_size: int = 8, sampling: SamplingConfig | None = None, max_prompt_tokens: int | None = None,
    records_dir: str | Path | None = None, name: str = "instruction",
) -> dict[str, Any]:  # fmt: skip
    """ROUGE-L (stemmed F1 ×100, max over references) and exact match of completions of ``prompt`` vs ``output``.

    Defaults follow the paper: sampling at T=1, top-p 1, top-k 0, no_repeat_ngram_size 6, five seeds; ``greedy``
    runs argmax decoding once (n-gram blocking kept). ``examples`` may be ``EvalExample`` or ``{"prompt",
    "output"}`` mappings. Returns ``metrics`` = {rougeL, rougeL_std, exact_match, exact_match_std} and more.
    """
    sampling = dataclasses.replace(sampling or PAPER_SAMPLING, greedy=greedy or (sampling or PAPER_SAMPLING).greedy)
    rows = as_examples(list(examples))
    return _evaluate(
        model, tokenizer, rows, [e.prompt for e in rows], name=name, kind="instruction", scorer=_text_scores,
        metric_names=("rougeL", "exact_match"), sampling=sampling, seeds=seeds, max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, stop_strings=(), records_dir=records_dir,
    )  # fmt: skip


def _gsm8k_scores(examples: list[EvalExample], generations: list[Generation]) -> list[dict[str, Any]]:
    scores = []
    for example, generation in zip(examples, generations, strict=True):
        predicted = extract_final_number(generation.text)
        scores.append({"predicted": predicted, "accuracy": 100.0 * (predicted == example.reference)})
    return scores


def evaluate_gsm8k(
    model, tokenizer, examples: Sequence[EvalExample], *, shots: Sequence[EvalExample] = (),
    use_chat_template: bool = False, sampling: SamplingConfig | None = None, seeds: Sequence[int] | None = None,
    max_new_tokens: int = 256, batch_size: int = 8, max_prompt_tokens: int | None = None,
    records_dir: str | Path | None = None, name: str = "gsm8k",
) -> dict[str, Any]:  # fmt: skip
    """Exact-match accuracy (×100) of the final number; greedy unless ``sampling`` is given. ``shots`` from train."""
    if use_chat_template:
        prompts = [P.chat_prompt(tokenizer, P.MATH_SYSTEM_PROMPT, e.prompt) for e in examples]
    else:
        prompts = [P.gsm8k_prompt(e, shots) for e in examples]
    return _evaluate(
        model, tokenizer, list(examples), prompts, name=name, kind="math", scorer=_gsm8k_scores,
        metric_names=("accuracy",), sampling=sampling or GREEDY, seeds=seeds, max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens, batch_size=batch_size,
        stop_strings=() if use_chat_template else P.GSM8K_STOP, records_dir=records_dir,
    )  # fmt: skip


def evaluate_code(
    model, tokenizer, examples: Sequence[EvalExample], *, task: str, shots: Sequence[EvalExample] = (),
    use_chat_template: bool = False, limits: SandboxLimits | None = None, workers: int = 4,
    sampling: SamplingConfig | None = None, seeds: Sequence[int] | None = None, max_new_tokens: int = 512,
    batch_size: int = 8, max_prompt_tokens: int | None = None, records_dir: str | Path | None = None,
    name: str | None = None, python: str | None = None, allow_unsandboxed: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """pass@1 (×100) for ``task`` ``humaneval`` or ``mbpp``: each completion runs in the sandbox, the dataset's
    tests in the trusted judge (``execution``). Raises ``SandboxUnavailable`` before generating anything when
    programs cannot be contained here and ``allow_unsandboxed`` is false."""
    if task not in ("humaneval", "mbpp"):
        raise ValueError(f"task must be 'humaneval' or 'mbpp', got {task!r}")
    limits = limits or SandboxLimits()
    isolation = detect_isolation(python, allow_unsandboxed)
    build_task = humaneval_task if task == "humaneval" else mbpp_task
    if use_chat_template:
        texts = [e.prompt if task == "humaneval" else P.mbpp_task_text(e) for e in examples]
        prompts = [P.chat_prompt(tokenizer, P.CODE_SYSTEM_PROMPT, text) for text in texts]
        stops: tuple[str, ...] = ()
    elif task == "humaneval":
        prompts, stops = [e.prompt for e in examples], P.HUMANEVAL_STOP
    else:
        prompts, stops = [P.mbpp_prompt(e, shots) for e in examples], P.MBPP_STOP

    def score(rows: list[EvalExample], generations: list[Generation]) -> list[dict[str, Any]]:
        tasks = [build_task(e, g.text, chat=use_chat_template) for e, g in zip(rows, generations, strict=True)]
        results = run_programs(tasks, limits, workers=workers, isolation=isolation)
        return [{"pass@1": 100.0 * r.passed, "execution": r.status, "execution_detail": r.detail} for r in results]

    result = _evaluate(
        model, tokenizer, list(examples), prompts, name=name or task, kind="code", scorer=score,
        metric_names=("pass@1",), sampling=sampling or GREEDY, seeds=seeds, max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, stop_strings=stops, records_dir=records_dir,
    )  # fmt: skip
    result["sandbox"] = {**isolation.as_dict(), **dataclasses.asdict(limits)}
    return result
