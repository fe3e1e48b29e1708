"""tools/plan_scale.py and docs/scaling.md: the doc's commands print the doc's blocks, and the numbers behind them
match hand computation from the Qwen2.5 config.json stand-ins (tests/fixtures/model_configs, shapes only).

Reference values here are written from the architecture and the stated assumptions, not from the tool's code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from tool_support import ROOT, load_tool

CONFIGS = ROOT / "tests/fixtures/model_configs"
DOC = ROOT / "docs/scaling.md"
GIB = 2**30


@pytest.fixture(scope="module")
def tool():
    module = load_tool("plan_scale")
    module.load_counts = functools.lru_cache(maxsize=None)(module.load_counts)  # the 72B meta build takes seconds
    return module


def _run(tool, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert tool.main(argv) == 0
    return out.getvalue()


def qwen2_parameters(config: dict) -> int:
    """Qwen2 decoder: q/k/v projections with bias, o and the SwiGLU MLP without, two RMSNorms per layer, a final
    norm, the token embedding and (untied) the LM head."""
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * inter + 2 * hidden
    embedding = config["vocab_size"] * hidden
    return layers * layer + hidden + embedding * (1 if config["tie_word_embeddings"] else 2)


@pytest.mark.parametrize(("name", "billions"), [("qwen2.5-72b-instruct", 72.7), ("qwen2.5-7b-instruct", 7.6),
                                                 ("qwen2.5-1.5b-instruct", 1.54)])
def test_parameter_counts_follow_the_architecture(tool, name, billions):
    config = json.loads((CONFIGS / name / "config.json").read_text())
    counts = tool.load_counts(str(CONFIGS / name), "--teacher")
    assert counts["total"] == qwen2_parameters(config)
    assert counts["total"] / 1e9 == pytest.approx(billions, abs=0.05)  # the model cards' sizes
    assert counts["head_params"] == config["vocab_size"] * config["hidden_size"]  # tied or not


def _doc_commands() -> list[tuple[list[str], str]]:
    """(argv, the ```text block after it) for each plan_scale command of docs/scaling.md."""
    text = DOC.read_text()
    pairs = []
    for match in re.finditer(r"```bash\n(.*?)```\n\n```text\n(.*?)```", text, flags=re.S):
        command = match.group(1).replace("\\\n", " ")
        if command.strip().startswith("python tools/plan_scale.py"):
            pairs.append((shlex.split(command)[2:], match.group(2)))
    return pairs


def test_doc_commands_print_the_doc_blocks(tool):
    pairs = _doc_commands()
    assert len(pairs) == 3
    for argv, block in pairs:
        assert _run(tool, argv) == block, " ".join(argv)


def test_plan_numbers_by_hand(tool):
    argv, _ = _doc_commands()[0]  # 72B -> 7B on 8 nodes x 8 GPUs
    assert argv[argv.index("--world-size") + 1] == "64"
    plan = json.loads(_run(tool, [*argv, "--json"]))
    teacher_cfg = json.loads((CONFIGS / "qwen2.5-72b-instruct/config.json").read_text())
    student_cfg = json.loads((CONFIGS / "qwen2.5-7b-instruct/config.json").read_text())
    teacher, student = qwen2_parameters(teacher_cfg), qwen2_parameters(student_cfg)
    head_t = 152064 * 8192
    head_s = 152064 * 3584
    memory = plan["memory"]
    placements = memory["teacher_placement"]
    assert placements["zero3"]["bytes_per_rank"] == -(-teacher // 64) * 2 + head_t * 2  # bf16 partition + head
    assert placements["replicated"]["bytes_per_rank"] == teacher * 2
    assert placements["cache"]["bytes_per_rank"] == head_t * 2
    assert memory["projector_params"] == 3584 * 8192
    # gathered bf16 head copy + fp32 accumulator + bf16 full-shape gradient
    assert memory["student_head_buffers_bytes_per_rank"] == head_s * (2 + 4 + 2)
    # DeepSpeed's ZeRO-3 estimate (zero.Init): 18 bytes per trained parameter over 64 ranks plus 4 bytes per
    # parameter of the largest layer (the [152064, 3584] embedding)
    trained = student + 3584 * 8192
    assert memory["trained_engine"]["accelerator_bytes_per_rank"] == pytest.approx(
        18 * trained / 64 + 4 * head_s, rel=1e-6)

    cache = plan["teacher_cache"]
    assert cache["bytes_per_row"] == {"bf16": 2 * 8192 + 4, "fp8_e4m3": 8192 + 8}  # + int32 position, fp32 scale
    assert cache["size_bytes"] == {"bf16": 15000 * 78 * 16388, "fp8_e4m3": 15000 * 78 * 8200}
    assert cache["read_bytes_per_step_per_rank"]["bf16"] == 8 * 78 * 16388
    assert plan["batch"]["steps_per_epoch"] == 15000 // (8 * 64)

    times = plan["step_time_per_micro_batch"]
    flops_per_s = 989e12 * 0.4
    tokens, rows = 8 * 143, 8 * 78
    link = 400e9 / 8  # Gbit/s -> bytes/s, the run spans nodes
    zero3 = times["zero3"]
    assert zero3["teacher_compute_s"] == pytest.approx(2 * teacher * tokens / flops_per_s, rel=1e-9)
    assert zero3["teacher_comm_s"] == pytest.approx(63 / 64 * 2 * teacher / link, rel=1e-9)
    assert zero3["student_comm_s"] == pytest.approx(3 * 63 / 64 * 2 * student / link, rel=1e-9)
    dskd_heads = 4 * (head_t + head_s) * rows
    assert zero3["student_compute_s"] == pytest.approx((6 * student * tokens + dskd_heads) / flops_per_s, rel=1e-9)
    cached = times["cache"]
    assert cached["teacher_compute_s"] == pytest.approx(2 * head_t * rows / flops_per_s, rel=1e-9)
    assert cached["teacher_comm_s"] == 0 and times["replicated"]["teacher_comm_s"] == 0
    for source in ("zero3", "replicated", "cache"):
        row = times[source]
        compute = row["teacher_compute_s"] + row["student_compute_s"]
        comm = row["teacher_comm_s"] + row["student_comm_s"]
        assert row["serial_s"] == pytest.approx(compute + comm) and row["overlapped_s"] == pytest.approx(
            max(compute, comm))
    assert plan["fits"] == {"zero3": True, "replicated": False, "cache": True}  # 140 - 16 GiB per GPU


def test_doc_cache_table_by_hand():
    """The 150-rows-per-example column and the per-row bytes of docs/scaling.md section 2."""
    text = DOC.read_text()
    for hidden in (8192, 3584):
        bf16, fp8 = 2 * hidden + 4, hidden + 8
        assert f"| {bf16:,} | {fp8:,} |" in text
        for rows in (78, 150):
            for size in (bf16, fp8):
                assert f"{15000 * rows * size / GIB:.2f} GiB" in text, (hidden, rows, size)


@pytest.mark.assets
def test_dry_run_on_the_stand_ins_matches_the_plan(asset, tool, tmp_path):
    """The doc's pre-flight command (7B -> 1.5B, Dolly sample with the Qwen tokenizer): the memory is the plan's,
    and the cache rows are the count the doc quotes."""
    tokenizer = asset("tokenizers/qwen1.5")
    data = asset("data/dolly/dev.jsonl")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    prealigned = tmp_path / "dolly_qwen"
    done = subprocess.run([sys.executable, str(ROOT / "tools/prealign.py"), "--teacher-tokenizer", str(tokenizer),
                           "--student-tokenizer", str(tokenizer), "--data", str(data), "--max-length", "512",
                           "--num-shards", "1", "--workers", "1", "--out", str(prealigned)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch/train.py"), "--config",
         str(ROOT / "configs/runs/math_qwen2.5-7b_to_qwen2.5-1.5b_dskd.yaml"), "--dry-run", "--plan-cache",
         "--world-size", "64", "--nodes", "8", f"teacher.path={CONFIGS / 'qwen2.5-7b-instruct'}",
         f"teacher.tokenizer={tokenizer}", f"student.path={CONFIGS / 'qwen2.5-1.5b-instruct'}",
         f"student.tokenizer={tokenizer}", f"data.train_dir={prealigned}", "data.eval_holdout=0",
         "data.micro_batch_size=8", "optim.grad_accum=1"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def section(header: str) -> dict:
        return json.JSONDecoder().raw_decode(done.stdout.split(header, 1)[1].split("\n", 1)[1])[0]

    memory = section("# per-rank model-state memory")
    cache = section("# teacher hidden-state cache")
    argv, _ = _doc_commands()[1]  # 7B -> 1.5B on 8 nodes
    plan = json.loads(_run(tool, [*argv, "--json"]))
    assert memory["bytes_per_rank_without_activations"] == plan["memory"]["bytes_per_rank_without_activations"]
    doc = DOC.read_text()
    shown = " / ".join(f"{memory['bytes_per_rank_without_activations'][s] / GIB:.2f}"
                       for s in ("zero3", "replicated", "cache"))
    assert f"= {shown} GiB" in doc.replace("\n", " "), shown
    assert cache["bytes_per_row"] == plan["teacher_cache"]["bytes_per_row"] == {"bf16": 7172, "fp8_e4m3": 3592}
    assert f"counts {cache['rows']['aligned']:,} aligned rows" in doc.replace("\n", " ")
    assert cache["rows"]["aligned"] == cache["rows"]["all_positions"]  # one tokenizer: every response row aligned
