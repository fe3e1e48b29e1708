"""The sandbox runs model code out of the evaluator's process, with limits, and passes exactly the right programs."""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from dskd_scale.eval.data import load_humaneval, load_mbpp
from dskd_scale.eval.execution import SandboxLimits, detect_isolation, run_program, run_programs
from dskd_scale.eval.prompts import humaneval_program, mbpp_program

FAST = SandboxLimits(timeout_s=5.0)


def _humaneval_rows(asset, count):
    with gzip.open(asset("data/humaneval/HumanEval.jsonl.gz"), "rt") as handle:
        return [json.loads(line) for line in handle][:count]


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail(asset):
    examples = load_humaneval(asset("data/humaneval/HumanEval.jsonl.gz"), limit=20).examples
    canonical = [humaneval_program(e, e.reference) for e in examples]
    wrong_return = [humaneval_program(e, "    return None\n") for e in examples[::2]]
    # the next task's solution: a plausible body that solves the wrong problem
    swapped = [humaneval_program(e, examples[(i + 1) % 20].reference) for i, e in enumerate(examples) if i % 2]
    results = run_programs(canonical + wrong_return + swapped, FAST, workers=2)
    assert [r.status for r in results[:20]] == ["passed"] * 20, [r.detail for r in results[:20]]
    assert [r.status for r in results[20:]] == ["failed"] * 20


def test_canonical_mbpp_solutions_pass(asset):
    suite, shots = load_mbpp(asset("data/mbpp/sanitized-mbpp.json"), limit=10)
    assert [s.extra["task_id"] for s in shots] == [2, 3, 4]
    programs = [mbpp_program(e, e.reference) for e in suite.examples]
    programs.append(mbpp_program(suite.examples[0], "def nothing():\n    pass\n"))
    results = run_programs(programs, FAST, workers=2)
    assert [r.status for r in results[:-1]] == ["passed"] * 10, [r.detail for r in results]
    assert results[-1].status == "failed" and "NameError" in results[-1].detail


def test_infinite_loop_is_killed_at_the_timeout():
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout"
    assert time.perf_counter() - started < 4.0


def test_early_clean_exit_does_not_count_as_passed():
    result = run_program("import os\nos._exit(0)\nassert False\n", FAST)
    assert result.status == "failed" and "before the end" in result.detail
    assert run_program("import sys\nsys.exit(0)\n", FAST).status == "failed"  # SystemExit is not a pass either


def test_program_cannot_write_outside_its_folder_or_delete_files(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "written_by_sandbox.txt"
    source = (
        f"try:\n    open({str(target)!r}, 'w').write('pwned')\n"
        "except Exception as e:\n    print('open', type(e).__name__)\n"
        f"import os\ntry:\n    os.remove({str(victim)!r})\n"
        "except Exception as e:\n    print('remove', type(e).__name__)\n"
        "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
    )
    result = run_program(source, FAST)
    assert result.status == "passed", result.detail
    assert not target.exists()
    assert victim.read_text() == "keep me"
    assert "fine" in result.stdout and "open PermissionError" in result.stdout


def test_program_cannot_read_the_evaluator_environment(monkeypatch):
    monkeypatch.setenv("DSKD_EVAL_SECRET", "s3cr3t-token")
    source = (
        "import os\nprint(sorted(os.environ))\nprint(sorted(os.environ.items()))\n"
        "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
    )
    result = run_program(source, FAST)
    assert result.status == "passed", result.detail
    assert "s3cr3t-token" not in result.stdout
    names = result.stdout.splitlines()[0]
    assert names == str(sorted(["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH",
                                "TMPDIR"]))  # fmt: skip
    if detect_isolation().uid_dropped:  # the parent's /proc environ belongs to another uid
        assert result.stdout.splitlines()[-1] == "PermissionError"
    assert os.environ["DSKD_EVAL_SECRET"] == "s3cr3t-token"  # and the evaluator's own environment is untouched


def test_isolation_layers_hold_where_available():
    isolation = detect_isolation()
    probe = run_program(
        "import os, socket\nprint('uid', os.getuid())\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    print('net open')\n"
        "except OSError as e:\n    print('net blocked')\n",
        FAST,
    )
    assert probe.status == "passed", probe.detail
    if isolation.uid_dropped:
        assert "uid 65534" in probe.stdout
    if isolation.network_isolated:
        assert "net blocked" in probe.stdout
    if os.geteuid() == 0:
        assert isolation.uid_dropped, "running as root must drop the uid of sandboxed programs"


def test_memory_limit_and_evaluator_survives():
    result = run_program("x = bytearray(1024 ** 3)\n", SandboxLimits(timeout_s=5.0, memory_bytes=256 * 1024**2))
    assert result.status == "failed" and "MemoryError" in result.detail
    cwd = os.getcwd()
    run_program("import os\nos.chdir('/')\n", FAST)
    assert os.getcwd() == cwd


def test_limits_validate():
    assert SandboxLimits(timeout_s=0).validate()
    assert not SandboxLimits().validate()


@pytest.mark.parametrize("snippet", ["import subprocess\nsubprocess.Popen(['true'])\n", "import ctypes\n"])
def test_process_creation_and_ctypes_are_disabled(snippet):
    assert run_program(snippet, FAST).status == "failed"
