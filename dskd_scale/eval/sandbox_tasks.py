"""HumanEval and MBPP runs as sandbox tasks: what is the model's (untrusted) and what is the dataset's (trusted).

The program the sandbox runs is what the model wrote in the context it was written for: HumanEval's prompt plus
the completion (or only the chat reply's code), MBPP's test imports plus the completion. The judge runs the
dataset's own code: for HumanEval the prompt (its imports and helpers such as ``poly`` or ``encode_cyclic``, which
the tests call directly) then ``test`` and ``check(<entry point>)``, with the entry point proxied to the program;
for MBPP the test imports then the asserts, with the functions they call (those the reference solution defines)
proxied to the program, and other names they read looked up in it (``sandbox_judge.bind_program_names``).
"""

from __future__ import annotations

import ast

from dskd_scale.eval.data import EvalExample
from dskd_scale.eval.execution import CodeTask
from dskd_scale.eval.prompts import first_code_block


def humaneval_task(example: EvalExample, completion: str, *, chat: bool = False) -> CodeTask:
    entry_point = example.extra["entry_point"]
    program = first_code_block(completion) if chat else example.prompt + completion
    return CodeTask(
        program=program,
        setup=example.prompt,
        test=f"{example.extra['test']}\n\ncheck({entry_point})\n",
        proxied=(entry_point,),
    )


def mbpp_task(example: EvalExample, completion: str, *, chat: bool = False) -> CodeTask:
    imports = "\n".join(example.extra["test_imports"])
    code = first_code_block(completion) if chat else completion
    test = "\n".join(example.extra["test_list"]) + "\n"
    # The functions under test: what the reference solution defines and the asserts call. Named explicitly, so a
    # task whose function is called like a builtin (task 126 ``sum``) reaches the program's, while other builtins
    # the asserts use (``set``, ``abs``) stay the real ones whatever the program defines.
    called = _names_read(test) & _top_level_names(example.reference or "")
    return CodeTask(program=f"{imports}\n{code}\n", setup=imports, test=test, proxied=tuple(sorted(called)))


def _names_read(source: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


def _top_level_names(source: str) -> set[str]:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return set()
    names = {node.name for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in body:
        if isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names
