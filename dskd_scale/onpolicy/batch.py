"""An on-policy step's micro-batches: the gold micro-batches' prompts, one student rollout each, aligned online,
collated into Contract 2 batches with the loader's own collator.

Per gold row, the prompt is the student ids before its first label position (prealignment's prompt, BOS
included, a token straddling the prompt/response boundary included), taken from the shards as they are, so
prealignment's truncation policy already applies: a prompt is at most ``max_length`` tokens on both sides.
A row without a label (a repeat slot filling the last step of an epoch) or without a prompt token (a prompt
dropped by that policy) gets no rollout: it stays in the batch as a repeat row that contributes nothing, so
every rank keeps the same micro-batch shapes of work.

A rollout row has no gold labels: ``student_labels`` and ``teacher_labels`` are -100 everywhere, so the student
CE term has no row (its count is 0 for the whole step) while the aligned rows feed every KD term. An empty
rollout (no response text) has no aligned row. A teacher sequence longer than the teacher's position limit is
cut there, its pairs beyond the cut dropped (``teacher_truncated`` counts such rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any

import numpy as np
import torch

from dskd_scale.alignment.online import RolloutRow, align_rollouts, prompt_text
from dskd_scale.data.format import IGNORE_INDEX
from dskd_scale.models.build import causal_lm_of

# prompts -> one rollout per prompt (sampled student ids; a final EOS when one was sampled)
Generate = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class RolloutPlan:
    """What an on-policy run fixes at start-up (``plan_rollouts``)."""

    whitespace: str  # online alignment mode: kd.on_policy.whitespace, else the training shards' manifest choice
    teacher_max_positions: int | None  # the teacher's position limit (None: none known)


def _positions(model: Any) -> int | None:
    value = getattr(causal_lm_of(model).config, "max_position_embeddings", None)
    return int(value) if value else None


def plan_rollouts(options: Any, manifest: dict[str, Any], student_model: Any, teacher_model: Any) -> RolloutPlan:
    """The run's ``RolloutPlan``; raises ValueError naming the key when rollouts cannot fit the models.

    An on-policy student sequence is a prealigned prompt (at most the manifest's ``max_length`` tokens) plus at
    most ``kd.on_policy.max_new_tokens`` sampled ids, so both models must accept ``max_length + max_new_tokens``
    positions; the teacher's tokenisation of the same text may still be longer (cut, see the module docstring).

    Args:
        options: ``kd.on_policy`` (``OnPolicyConfig``); manifest: the training shards' manifest;
        student_model, teacher_model: the Hugging Face models (a peft wrapper is fine).
    """
    longest = int(manifest["max_length"]) + options.max_new_tokens
    problems = []
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        limit = _positions(model)
        if limit is not None and longest > limit:
            problems.append(f"kd.on_policy.max_new_tokens={options.max_new_tokens}: a rollout may reach {longest} "
                            f"tokens (prompts up to the training shards' max_length={manifest['max_length']}, plus "
                            f"max_new_tokens), beyond the {role}'s {limit} positions; lower kd.on_policy."
                            f"max_new_tokens to at most {limit - int(manifest['max_length'])} or prealign with a "
                            "smaller --max-length")
    if problems:
        raise ValueError("; ".join(problems))
    whitespace = options.whitespace or manifest.get("alignment", {}).get("whitespace", "exact")
    return RolloutPlan(whitespace=whitespace, teacher_max_positions=_positions(teacher_model))


@dataclass
class RolloutStats:
    """Counts of one rank's rollouts in one step; summed over ranks in the step's one all-reduce."""

    rollouts: int = 0  # prompts that got a rollout
    generated_tokens: int = 0  # sampled ids, a final EOS included
    ended_with_eos: int = 0
    empty: int = 0  # no response text: no aligned row
    aligned_pairs: int = 0
    teacher_truncated: int = 0  # teacher sequences cut at the teacher's position limit

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def values(self) -> list[float]:
        return [float(v) for v in astuple(self)]

    def add_row(self, row: RolloutRow, response_length: int, pairs: int) -> None:
        self.rollouts += 1
        self.generated_tokens += response_length
        self.ended_with_eos += int(row.ended_with_eos)
        self.empty += int(row.empty)
        self.aligned_pairs += pairs


def rates(totals: dict[str, float]) -> dict[str, float]:
    """``onpolicy/*`` metrics of one step from the ``RolloutStats`` totals summed over ranks."""
    rollouts = max(totals["rollouts"], 1.0)
    return {"onpolicy/mean_generated_tokens": totals["generated_tokens"] / rollouts,
            "onpolicy/eos_rate": totals["ended_with_eos"] / rollouts,
            "onpolicy/empty_rate": totals["empty"] / rollouts,
            # aligned pairs per sampled response token (same tokenizer: 1 but for empty rollouts)
            "onpolicy/alignment_coverage": totals["aligned_pairs"] / max(totals["generated_tokens"], 1.0),
            "onpolicy/teacher_truncated": totals["teacher_truncated"]}


def step_prompts(batch: dict[str, torch.Tensor]) -> list[np.ndarray | None]:
    """Per row of a gold micro-batch: the student prompt ids (int64), or None for a row that gets no rollout."""
    labeled_BS = (batch["student_labels"] != IGNORE_INDEX).cpu().numpy()
    ids_BS = batch["student_input_ids"].cpu().numpy()
    first_B = labeled_BS.argmax(axis=1)
    return [ids_BS[b, : first_B[b]].astype(np.int64) if labeled_BS[b].any() and first_B[b] > 0 else None
            for b in range(ids_BS.shape[0])]


def _gold_row_as_repeat(batch: dict[str, torch.Tensor], b: int) -> dict[str, Any]:
    """Row ``b`` of a gold batch as a repeat example: same tokens, no label, no pair (collate.Collator)."""
    example: dict[str, Any] = {"is_repeat": True, "example_index": int(batch["example_index"][b])}
    for side in ("student", "teacher"):
        length = int(batch[f"{side}_attention_mask"][b].sum())
        ids = batch[f"{side}_input_ids"][b, :length].cpu().numpy()
        example[f"{side}_input_ids"], example[f"{side}_labels"] = ids, ids
        example[f"align_{side}"] = np.zeros(0, dtype=np.int64)
    return example


def _rollout_example(row: RolloutRow, example_index: int, teacher_max_length: int | None,
                     stats: RolloutStats) -> tuple[dict[str, Any], int]:
    """A rollout row as a collator example (labels -100 everywhere); returns it and its number of pairs."""
    teacher_ids, align_student, align_teacher = row.teacher_input_ids, row.align_student, row.align_teacher
    if teacher_max_length is not None and teacher_ids.size > teacher_max_length:
        keep = align_teacher < teacher_max_length
        teacher_ids, align_student, align_teacher = (teacher_ids[:teacher_max_length], align_student[keep],
                                                     align_teacher[keep])
        stats.teacher_truncated += 1
    example = {"student_input_ids": row.student_input_ids,
               "student_labels": np.full(row.student_input_ids.size, IGNORE_INDEX, dtype=np.int64),
               "teacher_input_ids": teacher_ids,
               "teacher_labels": np.full(teacher_ids.size, IGNORE_INDEX, dtype=np.int64),
               "align_student": align_student, "align_teacher": align_teacher, "example_index": example_index}
    return example, int(align_student.size)


def rollout_micro_batches(micro: Sequence[dict[str, torch.Tensor]], generate: Generate, *, student_tokenizer: Any,
                          teacher_tokenizer: Any, collator: Callable[[list[dict]], dict[str, torch.Tensor]],
                          whitespace: str, teacher_max_length: int | None = None,
                          ) -> tuple[list[dict[str, torch.Tensor]], RolloutStats]:
    """Replace the gold responses of a step's micro-batches by student rollouts (module docstring).

    ``generate`` is called ONCE with the prompts of all micro-batches (one parameter gather per step); on every
    rank, also with an empty list, since generation is collective. Returns the new micro-batches (same number,
    same rows, CPU tensors) and this rank's rollout counts.
    """
    prompts = [step_prompts(batch) for batch in micro]
    flat = [prompt for rows in prompts for prompt in rows if prompt is not None]
    responses = generate(flat)
    if len(responses) != len(flat):
        raise RuntimeError(f"rollout generation returned {len(responses)} rollouts for {len(flat)} prompts")
    stats, out, taken = RolloutStats(), [], 0
    for batch, rows in zip(micro, prompts, strict=True):
        prompted = [b for b, prompt in enumerate(rows) if prompt is not None]
        batch_responses = [np.asarray(r, dtype=np.int64).reshape(-1) for r in responses[taken: taken + len(prompted)]]
        taken += len(prompted)
        aligned = iter(align_rollouts(
            teacher_tokenizer, student_tokenizer, [prompt_text(student_tokenizer, rows[b]) for b in prompted],
            [rows[b] for b in prompted], batch_responses, whitespace=whitespace))
        lengths = iter(r.size for r in batch_responses)
        examples = []
        for b, prompt in enumerate(rows):
            if prompt is None:
                examples.append(_gold_row_as_repeat(batch, b))
                continue
            row = next(aligned)
            example, pairs = _rollout_example(row, int(batch["example_index"][b]), teacher_max_length, stats)
            stats.add_row(row, next(lengths), pairs)
            examples.append(example)
        out.append(collator(examples))
    return out, stats
