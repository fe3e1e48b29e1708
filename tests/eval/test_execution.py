"""Code execution: the dataset's tests judge the sandboxed program through proxies and pass exactly the right ones.

Hostile programs (escapes, forged verdicts, limits) are in ``test_sandbox_hostile.py``.
"""

from __future__ import annotations

import math
import time

import pytest

from dskd_scale.eval import execution
from dskd_scale.eval.data import load_humaneval, load_mbpp
from dskd_scale.eval.execution import (
    CodeTask,
    ExecutionResult,
    SandboxLimits,
    SandboxUnavailable,
    detect_isolation,
    run_program,
    run_programs,
)
from dskd_scale.eval.sandbox_tasks import humaneval_task, mbpp_task
from dskd_scale.eval.sandbox_wire import Opaque, WireError, decode, encode

FAST = SandboxLimits(timeout_s=10.0)
# MBPP tasks whose canonical solutions need more than "a function returning plain data": a function named like a
# builtin (126 ``sum``), a module the test reads from the program (596 ``sys``), re.Match results used for their
# truth value (737, 787, 794).
MBPP_SPECIAL = (126, 596, 737, 787, 794)


@pytest.fixture
def contained():
    """The isolation in use; skips (naming why) on a machine that cannot contain programs at all."""
    try:
        return detect_isolation()
    except SandboxUnavailable as err:
        pytest.skip(f"generated code cannot be contained on this machine: {err}")


def test_all_canonical_humaneval_solutions_pass_and_wrong_ones_fail(asset, contained):
    examples = load_humaneval(asset("data/humaneval/HumanEval.jsonl.gz")).examples
    canonical = [humaneval_task(e, e.reference) for e in examples]
    wrong_return = [humaneval_task(e, "    return None\n") for e in examples[:20:2]]
    # the next task's solution: a plausible body that solves the wrong problem
    swapped = [humaneval_task(e, examples[i + 1].reference) for i, e in enumerate(examples[:20]) if i % 2]
    results = run_programs(canonical + wrong_return + swapped, FAST, workers=2)
    failing = {e.extra["task_id"]: r.detail for e, r in zip(examples, results, strict=False) if not r.passed}
    assert len(examples) == 164 and failing == {}
    assert [r.status for r in results[164:]] == ["failed"] * 20


def test_canonical_mbpp_solutions_pass(asset, contained):
    suite, shots = load_mbpp(asset("data/mbpp/sanitized-mbpp.json"), test_ids=(0, 10**6))
    chosen = [e for e in suite.examples if e.extra["task_id"] in MBPP_SPECIAL or e.extra["task_id"] < 60]
    assert {e.extra["task_id"] for e in chosen} >= {2, 3, 4, *MBPP_SPECIAL}
    tasks = [mbpp_task(e, e.reference) for e in chosen]
    tasks.append(mbpp_task(chosen[0], "def nothing():\n    pass\n"))
    tasks.append(mbpp_task(chosen[0], chosen[1].reference))  # another task's solution
    results = run_programs(tasks, FAST, workers=2)
    failing = {e.extra["task_id"]: r.detail for e, r in zip(chosen, results, strict=False) if not r.passed}
    assert failing == {}
    assert results[-2].status == "failed" and "NameError" in results[-2].detail
    assert results[-1].status == "failed"


def test_exceptions_cross_as_builtin_types_and_unknown_names_fail(contained):
    program = "class Custom(Exception):\n    pass\n\ndef f(x):\n    if x < 0:\n        raise ValueError('neg')\n" \
        "    if x == 0:\n        raise Custom('zero')\n    return x\n"  # fmt: skip
    expects_value_error = "try:\n    f(-1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass\n"
    custom_is_not_value_error = "try:\n    f(0)\nexcept ValueError:\n    pass\n"
    results = run_programs(
        [CodeTask(program=program, test=expects_value_error), CodeTask(program=program, test=custom_is_not_value_error),
         CodeTask(program=program, test="assert g(1) == 1\n")], FAST,
    )  # fmt: skip
    assert [r.status for r in results] == ["passed", "failed", "failed"]
    assert "Custom: zero" in results[1].detail and "NameError" in results[2].detail


def test_results_are_plain_data_only(contained):
    program = "import re\nclass Box:\n    def __eq__(self, other):\n        return True\n\n" \
        "def box():\n    return Box()\n\ndef match(s):\n    return re.match('a', s)\n\ndef lazy(n):\n" \
        "    return map(str, range(n))\n"  # fmt: skip
    tests = [
        "assert box() == 1\n",  # an object of the program equals only itself in the judge
        "assert match('abc') and not match('xyz')\n",  # truth value crosses
        "assert list(lazy(3)) == ['0', '1', '2'] and lazy(2) != ['0', '1']\n",  # an iterator stays an iterator
    ]
    results = run_programs([CodeTask(program=program, test=test) for test in tests], FAST)
    assert [r.status for r in results] == ["failed", "passed", "passed"], [r.detail for r in results]


def test_program_stdout_is_kept_and_the_worker_dying_fails(contained):
    printed = run_program(CodeTask(program="print('hello')\ndef f():\n    print('called')\n    return 1\n",
                                   test="assert f() == 1\n"), FAST)  # fmt: skip
    assert printed.status == "passed" and printed.stdout == "hello\ncalled\n"
    died = run_program(CodeTask(program="import os\ndef f():\n    os._exit(0)\n",
                                test="try:\n    f()\nexcept Exception:\n    pass\n"), FAST)  # fmt: skip
    assert died.status == "failed" and "exited" in died.detail and "exit status 0" in died.detail
    raised_at_load = run_program(CodeTask(program="raise SystemExit(0)\n", test="pass\n"), FAST)
    assert raised_at_load.status == "failed" and "SystemExit" in raised_at_load.detail


def test_infinite_loop_is_killed_at_the_timeout(contained):
    started = time.perf_counter()
    result = run_program(CodeTask(program="def f():\n    while True:\n        pass\n", test="f()\n"),
                         SandboxLimits(timeout_s=1.0))  # fmt: skip
    assert result.status == "timeout"
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**200), 3**5000, 1.5, -0.0, math.inf, 1e-310, 2 + 3j, "", "naïve \ud800", b"\x00\xff",
     bytearray(b"ab"), [1, [2, (3,)]], (), {1, "a"}, frozenset({(1, 2)}), {(1, 2): [None], "k": {"n": 1.0}},
     range(2, 10, 3)],
)  # fmt: skip
def test_wire_round_trips_plain_data_exactly(value):
    back = decode(encode(value))
    assert type(back) is type(value) and repr(back) == repr(value)


def test_wire_nan_iterators_opaque_and_malformed():
    assert math.isnan(decode(encode(math.nan)))
    assert list(decode(encode(iter([1, 2])))) == [1, 2] and list(decode(encode(x for x in "ab"))) == ["a", "b"]
    with pytest.raises(WireError):
        encode(object())
    opaque = decode(encode(object(), opaque=True))
    assert isinstance(opaque, Opaque) and bool(opaque) and opaque != opaque.text
    for bad in (["int", "zz"], ["set", [["list", []]]], ["dict", [[1]]], ["pickle", "x"], {"a": 1}, ["str", 5]):
        with pytest.raises(WireError):
            decode(bad)


def test_limits_validate():
    assert SandboxLimits(timeout_s=0).validate()
    assert SandboxLimits(disk_bytes=0).validate()
    assert not SandboxLimits().validate()


def test_detected_isolation_contains_programs(contained):
    isolation = contained
    assert isolation.contained and isolation.mode in ("userns", "root")
    assert isolation.as_dict()["namespaces"].startswith(("user+pid+mount+net", "pid+mount+net"))


def test_refuses_to_run_uncontained_unless_allowed(monkeypatch):
    detect_isolation.cache_clear()
    broken = ExecutionResult("error", "the sandbox did not start: unshare: Operation not permitted", "", 0.0)
    monkeypatch.setattr(execution, "_run", lambda task, limits, isolation: broken)
    try:
        with pytest.raises(SandboxUnavailable, match="allow-unsandboxed-execution"):
            detect_isolation()
        assert detect_isolation(allow_unsandboxed=True).mode == "none"
    finally:
        detect_isolation.cache_clear()
