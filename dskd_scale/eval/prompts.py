"""Prompts and stop strings for the math and code suites (programs are assembled in ``sandbox_tasks``).

- GSM8K: "Question: ...\\nAnswer: <solution> #### <n>" few-shot from the first ``shots`` training rows (calculator
  annotations ``<<...>>`` removed), stop at the next "Question:". Zero-shot when ``shots`` is 0.
- HumanEval: the task prompt is completed as is (Codex protocol), stopping at the next top-level statement.
- MBPP: the 3-shot "[BEGIN] ... [DONE]" prompt of Austin et al. (2021) with tasks 2, 3, 4.
With ``use_chat_template`` the question goes through the tokenizer's chat template instead (for chat students),
and the code is taken from the first fenced block of the reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dskd_scale.eval.data import EvalExample

GSM8K_STOP = ("\n\nQuestion:", "Question:")
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ("[DONE]",)
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_SYSTEM_PROMPT = "You are an excellent assistant! Please follow the description to generate the code function."

_CALCULATOR = re.compile(r"<<[^>]*>>")
_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)


def chat_prompt(tokenizer, system: str, user: str) -> str:
    """``user`` wrapped by the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"use_chat_template is set but the tokenizer {tokenizer.name_or_path} has no chat template")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def gsm8k_prompt(example: EvalExample, shots: Sequence[EvalExample]) -> str:
    demos = "".join(
        f"Question: {shot.prompt}\nAnswer: {_CALCULATOR.sub('', shot.extra['solution'])}\n\n" for shot in shots
    )
    return f"{demos}Question: {example.prompt}\nAnswer:"


def mbpp_task_text(example: EvalExample) -> str:
    tests = "\n".join(example.extra["test_list"])
    return f"You are an expert Python programmer, and here is your task: {example.prompt} " \
        f"Your code should pass these tests:\n\n{tests}\n"


def mbpp_prompt(example: EvalExample, shots: Sequence[EvalExample]) -> str:
    demos = "".join(f"{mbpp_task_text(shot)}[BEGIN]\n{shot.reference}\n[DONE]\n" for shot in shots)
    return f"{demos}{mbpp_task_text(example)}[BEGIN]\n"


def first_code_block(text: str) -> str:
    """The content of the first fenced code block (an unterminated fence runs to the end), else ``text``."""
    match = _FENCE.search(text)
    return match.group(1) if match else text
