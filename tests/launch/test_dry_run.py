"""``launch/train.py --dry-run`` as a pre-flight check: every problem in one list (exit 2), the plan, memory.

Runs in-process (``tiny_models.train_cli``) on tiny stand-ins: model folders holding a demo tokenizer and a
random model's config.json, and demo data prealigned for that pair.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import ROOT, lay_out_run_config, tiny_inputs, train_cli

RUN_CONFIGS = sorted((ROOT / "configs/runs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_inputs(tmp_path_factory)


def _json_after(out: str, header: str) -> dict:
    return json.JSONDecoder().raw_decode(out.split(header, 1)[1].lstrip())[0]


def test_every_run_config_passes_from_its_documented_layout(tiny, tmp_path):
    """Each configs/runs recipe, unchanged, from a folder holding the paths it names (links to the stand-ins)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert RUN_CONFIGS
    for config in RUN_CONFIGS:
        lay_out_run_config(config, tmp_path, teacher=tiny.teacher, student=tiny.student, data=tiny.prealigned)
        status, out, err = train_cli(["--config", f"configs/runs/{config.name}", "--dry-run", "--world-size", "16",
                                      "--nodes", "2"], tmp_path)
        assert status == 0, f"{config.name}:\n{err}"
        assert "dry run OK: 16 ranks on 2 node(s)" in out, config.name


def test_plan_and_memory_for_both_teacher_placements(tiny, tmp_path):
    config = "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"
    status, out, err = train_cli(
        ["--config", str(ROOT / config), "--dry-run", "--world-size", "4", "--nodes", "2",
         f"teacher.path={tiny.teacher}", f"student.path={tiny.student}", f"data.train_dir={tiny.prealigned}",
         "data.eval_dir=", "data.micro_batch_size=2", "optim.grad_accum=3", "optim.epochs=2",
         f"engine.zero_tuning={ROOT / 'configs/deepspeed/zero3_large_buckets.json'}"], tmp_path)
    assert status == 0, err
    plan = _json_after(out, "# plan")
    assert plan["train_examples"] == 800 and plan["global_batch_size"] == 2 * 3 * 4
    # 800 rows over 4 ranks = 200 per rank = 100 micro-batches of 2; 33 steps of 3 micro-batches; 2 epochs
    assert plan["micro_batches_per_rank_per_epoch"] == 100
    assert plan["steps_per_epoch"] == 33 and plan["total_steps"] == 66
    assert "global batch 24, 33 steps per epoch, 66 steps in total" in out
    memory = _json_after(out, "# per-rank model-state memory (DeepSpeed ZeRO-3 estimator)")
    teacher_params = memory["teacher_params"]
    placements = memory["teacher_placement"]
    head = placements["cache"]["head_params"]  # with teacher.cache_dir: the frozen [V, D] teacher head only
    assert head == json.loads((tiny.teacher / "config.json").read_text())["vocab_size"] * 64  # [V, 64]
    assert placements["zero3"]["partition_bytes"] == -(-teacher_params // 4) * 2  # bf16 partition over 4 ranks
    assert placements["zero3"]["bytes_per_rank"] == -(-teacher_params // 4) * 2 + head * 2  # + the gathered head
    assert placements["replicated"]["bytes_per_rank"] == teacher_params * 2
    assert memory["ranks_per_node"] == 2 and memory["projector_params"] == 32 * 64
    trained = memory["trained_engine"]["accelerator_bytes_per_rank"]
    states = {"zero3": trained + placements["zero3"]["bytes_per_rank"], "replicated": trained + teacher_params * 2,
              "cache": trained + head * 2}
    assert memory["model_states_bytes_per_rank"] == states
    # the student head's bf16 copy, fp32 gradient accumulator and bf16 full-shape gradient: 8 bytes per weight
    student_head = memory["student_head_buffers_bytes_per_rank"]
    assert student_head == json.loads((tiny.student / "config.json").read_text())["vocab_size"] * 32 * 8  # [V, 32]
    assert memory["bytes_per_rank_without_activations"] == {name: states[name] + student_head for name in states}
    assert "# teacher hidden-state cache" not in out  # neither configured nor asked for (--plan-cache)


def test_teacher_cache_is_sized_from_the_shards(tiny, tmp_path):
    """--plan-cache: rows counted from the shards (read here with pyarrow), priced at 2E+4 (bf16) and E+8 (fp8:
    values, int32 position, fp32 scale)."""
    import pyarrow.parquet as pq

    status, out, err = train_cli(
        ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
         "--plan-cache", "--world-size", "4", f"teacher.path={tiny.teacher}", f"student.path={tiny.student}",
         f"data.train_dir={tiny.prealigned}", "data.eval_dir=", "data.eval_holdout=100", "data.micro_batch_size=2",
         "optim.grad_accum=3", f"engine.zero_tuning={ROOT / 'configs/deepspeed/zero3_large_buckets.json'}"], tmp_path)
    assert status == 0, err
    cache = _json_after(out, "# teacher hidden-state cache of data.train_dir (bytes per row: bf16 2E+4, fp8_e4m3 E+8)")
    manifest = json.loads((tiny.prealigned / "manifest.json").read_text())
    tables = [pq.read_table(tiny.prealigned / shard["file"]) for shard in manifest["shards"]]
    aligned = sum(len(row) for table in tables for row in table.column("align_teacher").to_pylist())
    # all_positions: from the position before the first response label to the second-to-last position
    response = sum(len(row) - 1 - max([i for i, label in enumerate(row) if label != -100][0] - 1, 0)
                   for table in tables for row in table.column("teacher_labels").to_pylist())
    assert cache["examples"] == 800  # the hold-out is in the cache too (it covers data.train_dir)
    assert cache["rows"] == {"aligned": aligned, "all_positions": response} and 0 < aligned <= response
    assert cache["bytes_per_row"] == {"bf16": 2 * 64 + 4, "fp8_e4m3": 64 + 8}  # teacher hidden size 64
    assert cache["size_bytes"] == {"bf16": aligned * 132, "fp8_e4m3": aligned * 72}
    assert cache["size_bytes_all_positions"] == {"bf16": response * 132, "fp8_e4m3": response * 72}
    assert cache["read_bytes_per_step_per_rank"]["bf16"] == round(aligned / 800 * 2 * 3 * 132)
    assert cache["read_bytes_per_step_all_ranks"]["fp8_e4m3"] == round(aligned / 800 * 2 * 3 * 4 * 72)
    memory = _json_after(out, "# per-rank model-state memory (DeepSpeed ZeRO-3 estimator)")
    assert memory["teacher_placement"]["configured"] == "zero3"  # asked for, not configured
    status, _, err = train_cli(
        ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
         f"teacher.path={tiny.teacher}", f"student.path={tiny.student}", f"data.train_dir={tiny.prealigned}",
         "data.eval_dir=", "teacher.cache_dir=no_cache"], tmp_path)
    assert status == 2 and f"teacher.cache_dir=no_cache (= {tmp_path}/no_cache): no such folder" in err
    (tmp_path / "half_written").mkdir()  # no manifest.json: an interrupted tools/cache_teacher.py
    status, _, err = train_cli(
        ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
         f"teacher.path={tiny.teacher}", f"student.path={tiny.student}", f"data.train_dir={tiny.prealigned}",
         "data.eval_dir=", "teacher.cache_dir=half_written",
         f"engine.zero_tuning={ROOT / 'configs/deepspeed/zero3_large_buckets.json'}"], tmp_path)
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert status == 2 and len(problems) == 1, err
    assert "teacher.cache_dir=half_written" in problems[0] and "manifest.json" in problems[0]


def test_configured_teacher_cache_is_opened_and_priced(tiny, tmp_path):
    """teacher.cache_dir written by the cache writer: opened as training opens it, no teacher engine, the head-only
    memory configured, and the rows predicted from the shards are the rows the writer wrote."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dskd_scale.config.run import ModelConfig
    from dskd_scale.teacher_cache.writer import CacheWriteConfig, run_cache_teacher

    teacher = tmp_path / "teacher"  # the tiny teacher with weights: a cache is fingerprinted by them
    shutil.copytree(tiny.teacher, teacher)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)).save_pretrained(teacher)
    manifest = run_cache_teacher(CacheWriteConfig(teacher=ModelConfig(path=str(teacher)), data_dir=str(tiny.prealigned),
                                                  out=str(tmp_path / "cache"), dtype="fp8_e4m3", batch_size=32,
                                                  num_shards=2))
    status, out, err = train_cli(
        ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
         "--world-size", "4", "teacher.path=teacher", "teacher.cache_dir=cache", f"student.path={tiny.student}",
         f"data.train_dir={tiny.prealigned}", "data.eval_dir=",
         f"engine.zero_tuning={ROOT / 'configs/deepspeed/zero3_large_buckets.json'}"], tmp_path)
    assert status == 0, err
    assert "# DeepSpeed config (teacher engine)" not in out  # a cached run builds no teacher engine
    cache = _json_after(out, "# teacher hidden-state cache of data.train_dir (bytes per row: bf16 2E+4, fp8_e4m3 E+8)")
    assert cache["rows"]["aligned"] == manifest["num_rows"] and cache["examples"] == manifest["num_examples"]
    assert cache["configured"] == {"folder": "cache", "mode": "aligned", "dtype": "fp8_e4m3",
                                   "examples": manifest["num_examples"], "bytes_per_row": 64 + 8}
    memory = _json_after(out, "# per-rank model-state memory (DeepSpeed ZeRO-3 estimator)")
    assert memory["teacher_placement"]["configured"] == "cache"
    assert memory["teacher_bytes_per_rank"] == memory["teacher_placement"]["cache"]["head_params"] * 2


def test_every_problem_is_listed_in_one_exit_2(tiny, tmp_path):
    """Missing tokenizer and model folders, a missing tuning file, a data folder without manifest: one list."""
    (tmp_path / "empty_data").mkdir()
    no_config = tmp_path / "tokenizer_only"
    shutil.copytree(tiny.teacher, no_config)
    (no_config / "config.json").unlink()
    status, out, err = train_cli(
        ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
         "teacher.path=tokenizer_only", "student.path=no/such/student", "data.train_dir=empty_data",
         "data.eval_dir=missing_valid", "engine.zero_tuning=missing_tuning.json", "--world-size", "3",
         "--nodes", "2"], tmp_path)
    assert status == 2 and out == ""
    assert f"relative paths are resolved against the current directory {tmp_path}" in err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    text = "\n".join(problems)
    assert "--world-size 3 / --nodes 2" in text
    assert f"student.path=no/such/student (= {tmp_path}/no/such/student): cannot load a tokenizer" in text
    assert f"student.path=no/such/student (= {tmp_path}/no/such/student): no such folder" in text
    assert "teacher.path=tokenizer_only" in text and "no config.json in this folder" in text
    assert f"engine.zero_tuning=missing_tuning.json (= {tmp_path}/missing_tuning.json): no such file" in text
    assert "data.train_dir=empty_data" in text and "no manifest" in text
    assert "data.eval_dir=missing_valid" in text
    assert len(problems) == 7, text


def test_mismatched_tokenizer_fingerprint_is_refused(tiny, tmp_path):
    """Shards prealigned for (teacher, student), run configured with the student as teacher too."""
    status, _, err = train_cli(
        ["--config", str(ROOT / "configs/tests/tiny_dskd_eta.yaml"), "--dry-run",
         f"teacher.tokenizer={tiny.student}", f"student.tokenizer={tiny.student}",
         f"data.train_dir={tiny.prealigned}"], tmp_path)
    assert status == 2
    assert "data.train_dir" in err and "teacher_tokenizer.fingerprint" in err


def test_corrupted_shard_is_refused(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny.prealigned, data)
    shard = sorted(data.glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    status, _, err = train_cli(
        ["--config", str(ROOT / "configs/tests/tiny_dskd_eta.yaml"), "--dry-run",
         f"teacher.tokenizer={tiny.teacher}", f"student.tokenizer={tiny.student}", "data.train_dir=data"], tmp_path)
    assert status == 2 and "sha256" in err and shard.name in err


def test_relative_paths_resolve_against_the_working_directory(tiny, tmp_path):
    """From a folder outside the repository: relative paths there work; the repository's do not (named)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m/teacher").symlink_to(tiny.teacher)
    (tmp_path / "m/student").symlink_to(tiny.student)
    (tmp_path / "aligned").symlink_to(tiny.prealigned)
    shutil.copy(ROOT / "configs/deepspeed/zero3_memory_lean.json", tmp_path / "tuning.json")
    base = ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
            "teacher.path=m/teacher", "student.path=m/student", "data.train_dir=aligned", "data.eval_dir=aligned"]
    status, out, err = train_cli([*base, "engine.zero_tuning=tuning.json"], tmp_path)
    assert status == 0, err
    status, _, err = train_cli(base, tmp_path)  # the config's own configs/deepspeed/... is repository-relative
    assert status == 2
    assert (f"engine.zero_tuning=configs/deepspeed/zero3_large_buckets.json "
            f"(= {tmp_path}/configs/deepspeed/zero3_large_buckets.json): no such file") in err


def test_config_errors_come_before_any_file_is_opened(tmp_path):
    status, out, err = train_cli(["--config", str(ROOT / "configs/tests/tiny_sft.yaml"), "--dry-run",
                                  "kd.temperature=hot", "optim.grad_accum=0"], tmp_path)
    assert status == 2 and "kd.temperature (command line): expected a number" in err
    assert "optim.grad_accum (command line) must be > 0" in err


def test_world_size_comes_from_the_flag_or_the_environment(tiny, monkeypatch):
    args = ["--config", str(ROOT / "configs/tests/tiny_sft.yaml"), "--dry-run",
            f"student.tokenizer={tiny.student}", f"teacher.tokenizer={tiny.teacher}",
            f"data.train_dir={tiny.prealigned}"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    status, out, err = train_cli(args, ROOT)
    assert status == 0, err
    assert "dry run OK: 4 ranks on 2 node(s)" in out
    status, out, err = train_cli([*args, "--world-size", "8"], ROOT)
    assert status == 0 and "dry run OK: 8 ranks on 4 node(s)" in out  # 8 ranks, LOCAL_WORLD_SIZE=2 per node
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    status, out, err = train_cli([*args, "--world-size", "8", "--nodes", "1"], ROOT)
    assert status == 0 and "dry run OK: 8 ranks on 1 node(s)" in out


def test_help_names_only_files_that_exist():
    import re

    status, out, _ = train_cli(["--help"], ROOT)
    assert status == 0
    named = set(re.findall(r"configs/[\w./-]+\.yaml", out))
    assert named and all((ROOT / path).is_file() for path in named), named
    assert Path(ROOT / "configs/runs").is_dir()


def test_a_tokenizer_larger_than_its_model_embedding_is_refused(tiny, tmp_path):
    """A tokenizer set apart from its model is fine, unless it has token ids the model's embedding lacks."""
    small = tmp_path / "small_vocab_teacher"
    shutil.copytree(tiny.teacher, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    args = ["--config", str(ROOT / "configs/runs/dolly_qwen2.5-7b_to_llama3.2-1b_dskd_eta.yaml"), "--dry-run",
            f"student.path={tiny.student}", f"data.train_dir={tiny.prealigned}", "data.eval_dir=",
            f"engine.zero_tuning={ROOT / 'configs/deepspeed/zero3_large_buckets.json'}"]
    status, _, err = train_cli([*args, f"teacher.path={small}"], tmp_path)
    assert status == 2 and "teacher.path=" in err and "more than the 10 rows of teacher.path's embedding" in err
    status, _, err = train_cli([*args, f"teacher.path={small}", f"teacher.tokenizer={tiny.teacher}"], tmp_path)
    assert status == 2 and "teacher.tokenizer=" in err
    status, _, err = train_cli([*args, f"teacher.path={tiny.teacher}", f"teacher.tokenizer={tiny.teacher}"], tmp_path)
    assert status == 0, err


def test_world_size_flags_without_dry_run_are_refused(tmp_path):
    status, _, err = train_cli(["--config", str(ROOT / "configs/tests/tiny_sft.yaml"), "--world-size", "8"],
                               tmp_path)
    assert status == 2 and "--world-size/--nodes plan a --dry-run" in err
    status, _, err = train_cli(["--config", str(ROOT / "configs/tests/tiny_sft.yaml"), "--plan-cache"], tmp_path)
    assert status == 2 and "--plan-cache sizes a teacher cache in a --dry-run" in err
