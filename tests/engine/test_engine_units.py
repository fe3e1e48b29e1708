"""Engine pieces that need no process group: import guard, configs, DS config builder, schedule, optimizer
groups, head-gradient routing, checkpoint bookkeeping, and the CLI's dry-run and refusals."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from engine_helpers import PROJECT_ROOT, check, run_env

from dskd_scale.config.loader import ConfigError, load_config
from dskd_scale.config.run import ModelConfig, OptimConfig, RunConfig


def test_only_the_engine_package_imports_deepspeed():
    offenders = []
    for path in sorted((PROJECT_ROOT / "dskd_scale").rglob("*.py")):
        if (PROJECT_ROOT / "dskd_scale" / "engine") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "deepspeed" or name.startswith("deepspeed.") for name in names):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert not offenders, f"deepspeed imported outside dskd_scale/engine: {offenders}"


def _yaml_files() -> list[Path]:
    return sorted((PROJECT_ROOT / "configs").rglob("*.yaml")) + sorted((PROJECT_ROOT / "configs").rglob("*.yml"))


def test_configs_folder_has_run_configs():
    names = {p.relative_to(PROJECT_ROOT / "configs").as_posix() for p in _yaml_files()}
    for criterion in ("sft", "vanilla_kd", "dskd", "dskd_eta", "dskd_cma", "uld", "mined"):
        assert f"tests/tiny_{criterion}.yaml" in names
    assert sum(name.startswith("runs/") for name in names) >= 4


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.relative_to(PROJECT_ROOT / "configs").as_posix())
def test_every_yaml_under_configs_parses_and_validates(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: top level must be a mapping"
    if "student" in data or "kd" in data:  # a run config (others, e.g. prealign settings, only need to parse)
        config = load_config(RunConfig, path)
        if config.engine.zero_tuning:
            from dskd_scale.engine.ds_config import load_zero_tuning

            load_zero_tuning(str(PROJECT_ROOT / config.engine.zero_tuning))


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs" / "deepspeed").glob("*.json")),
                         ids=lambda p: p.name)
def test_deepspeed_tuning_files_hold_only_tuning_knobs(path):
    from dskd_scale.engine.ds_config import load_zero_tuning

    assert load_zero_tuning(str(path))


def test_config_errors_name_every_bad_key():
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, PROJECT_ROOT / "configs/tests/tiny_dskd_eta.yaml",
                    ["kd.criterion=dskd_v9", "kd.alpha=1.5", "optim.grad_acum=2"])
    message = str(error.value)
    assert "kd.criterion" in message and "dskd_v9" in message
    assert "kd.alpha" in message and "optim.grad_acum" in message and "did you mean 'grad_accum'" in message


def test_tuning_file_with_batch_or_ga_fields_is_refused(tmp_path):
    from dskd_scale.config.run import EngineConfig
    from dskd_scale.engine.ds_config import DeepSpeedConfigError, student_ds_config

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": 4,
                               "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}))
    with pytest.raises(DeepSpeedConfigError) as error:
        student_ds_config(EngineConfig(zero_tuning=str(bad)), OptimConfig(), 4)
    for key in ("train_batch_size", "gradient_accumulation_steps", "zero_optimization.stage"):
        assert key in str(error.value) and str(bad) in str(error.value)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123, "stage3_prefetch_bucket_size": 7}}))
    config = student_ds_config(EngineConfig(zero_tuning=str(good), precision="bf16"), OptimConfig(grad_accum=3), 4)
    assert config["zero_optimization"] == {"reduce_bucket_size": 123, "stage3_prefetch_bucket_size": 7, "stage": 3,
                                           "stage3_gather_16bit_weights_on_model_save": True}
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 1.0


@pytest.mark.parametrize(("impl", "offload", "cuda", "torch_adam", "force_ds_cpu"), [
    ("auto", "none", True, True, None),  # no JIT build at start-up on a GPU
    ("auto", "cpu", True, False, None),  # DeepSpeed's CPUAdam for an offloaded optimizer
    ("torch", "cpu", True, True, False),  # torch AdamW on the offloaded partitions: DeepSpeed must allow it
    ("deepspeed", "none", True, False, None),
    ("deepspeed", "cpu", False, True, False),  # CPU-only: always torch (no 70 s JIT)
])
def test_adam_implementation_follows_optim_adam_impl(monkeypatch, impl, offload, cuda, torch_adam, force_ds_cpu):
    from dskd_scale.config.run import EngineConfig
    from dskd_scale.engine import ds_config

    monkeypatch.setattr(ds_config.torch.cuda, "is_available", lambda: cuda)
    assert not OptimConfig(adam_impl=impl).problems()
    config = ds_config.student_ds_config(EngineConfig(offload_optimizer=offload), OptimConfig(adam_impl=impl), 2)
    assert config["optimizer"]["params"].get("torch_adam", False) is torch_adam
    assert config.get("zero_force_ds_cpu_optimizer") is force_ds_cpu
    assert "optim.adam_impl" in OptimConfig(adam_impl="fused").problems()[0]


def test_schedule_warms_up_then_decays_to_min_lr_for_every_group():
    from dskd_scale.engine.build import lr_lambda

    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=4, schedule="cosine")
    multiplier = lr_lambda(optim, total_steps=20, base_lr=1e-3)
    assert [multiplier(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert multiplier(4) == pytest.approx(1.0)
    assert multiplier(12) == pytest.approx(0.01 + 0.99 * 0.5)  # cosine midpoint
    assert multiplier(20) == pytest.approx(0.01) and multiplier(100) == pytest.approx(0.01)
    projector = lr_lambda(optim, total_steps=20, base_lr=1e-2)  # own base LR, same floor in absolute terms
    assert projector(20) * 1e-2 == pytest.approx(1e-5)
    linear = lr_lambda(OptimConfig(lr=1.0, min_lr=0.0, schedule="linear"), total_steps=10, base_lr=1.0)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_optimizer_groups_cover_each_parameter_once_and_never_decay_norms(architecture, asset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_scale.engine.build import param_groups
    from dskd_scale.models.build import random_model_config
    from dskd_scale.models.wrappers import DistillStudent
    from dskd_scale.projectors import T2SProjector

    tokenizer = AutoTokenizer.from_pretrained(asset("tokenizers/gpt2"))
    spec = ModelConfig(tokenizer="x", architecture=architecture, hidden_size=16, num_layers=1, num_heads=2)
    model = AutoModelForCausalLM.from_config(random_model_config(spec, tokenizer))
    module = DistillStudent(model, T2SProjector(24, 16))
    groups = {g["name"]: g for g in param_groups(module, OptimConfig(lr=1e-3, projector_lr=5e-3, weight_decay=0.1))}
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert len(seen) == len(set(seen)) == len({id(p) for p in module.parameters() if p.requires_grad})
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay = {names[id(p)] for p in groups["student_no_decay"]["params"]}
    norms = {n for n, p in module.named_parameters() if "norm" in n or ".ln_" in n or n.endswith(".bias")}
    assert norms and norms <= no_decay and all(p.ndim == 1 for p in groups["student_no_decay"]["params"])
    assert groups["student_no_decay"]["weight_decay"] == 0.0 and groups["student"]["weight_decay"] == 0.1
    assert groups["projector"]["lr"] == 5e-3 and [names[id(p)] for p in groups["projector"]["params"]] == [
        "t2s_projector.weight"]


def test_trainable_head_leaves_route_the_exact_gradient_to_the_parameter():
    """Chunked uses of the head (several leaves) + a tied embedding use sum to the plain autograd gradient.

    In fp64: the two sides add the same per-chunk gradients in a different order, which is exact up to fp64 rounding.
    """
    from dskd_scale.engine.heads import StudentHead

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False, dtype=torch.float64)
    hidden = torch.randn(9, 6, dtype=torch.float64)
    labels = torch.randint(0, 11, (9,))
    ids = torch.randint(0, 11, (4,))

    def loss_with(weight_fn, embed_weight):
        chunks = [torch.nn.functional.cross_entropy(weight_fn()(h), y, reduction="sum")
                  for h, y in zip(hidden.split(4), labels.split(4), strict=True)]
        return sum(chunks) + torch.nn.functional.embedding(ids, embed_weight).square().sum()

    loss_with(lambda: (lambda h: h @ head.weight.T), head.weight).backward()
    expected = head.weight.grad.clone()
    head.weight.grad = None

    student_head = StudentHead(head)
    student_head.refresh()
    loss_with(student_head.trainable_head, head.weight).backward()
    assert student_head.route_gradients()
    torch.testing.assert_close(head.weight.grad, expected)
    assert not student_head.route_gradients()  # leaves are consumed once


def test_checkpoint_pruning_keeps_last_k_complete_and_removes_stale_partials(tmp_path):
    from dskd_scale.engine import checkpoint as ckpt

    for step, complete in ((2, True), (4, True), (5, False), (6, True), (8, False)):
        folder = tmp_path / ckpt.step_tag(step)
        folder.mkdir()
        if complete:
            (folder / ckpt.COMPLETE_MARKER).write_text("{}")
    ckpt._prune(tmp_path, keep=2, current=ckpt.step_tag(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.step_tag(s) for s in (4, 6, 8)]
    assert ckpt.latest_complete_tag(tmp_path) == ckpt.step_tag(6)  # no `latest` file: newest complete


@pytest.fixture(scope="module")
def demo_tokenizers(tmp_path_factory):
    from dskd_scale.demo import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("tok") / "a", seed=3, train=24, valid=2, test=2)


def test_mismatched_tokenizer_fingerprint_is_refused(demo):
    """Shards prealigned for the demo teacher tokenizer, run configured with the student tokenizer as teacher."""
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "launch" / "train.py"), "--config", "configs/tests/tiny_dskd_eta.yaml",
         f"teacher.tokenizer={demo['student_tokenizer']}", f"student.tokenizer={demo['student_tokenizer']}",
         f"data.train_dir={demo['eta']}", f"output_dir={demo['root'] / 'refused'}"],
        cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True, timeout=180)
    check(result, expected=2)
    assert "data.train_dir" in result.stderr and "fingerprint" in result.stderr.lower()
    assert not (demo["root"] / "refused" / "checkpoints").exists()


def test_sft_single_process_trains_and_checkpoints(demo, tmp_path):
    from engine_helpers import demo_overrides, launch, metrics

    out = tmp_path / "sft"
    result = launch("configs/tests/tiny_sft.yaml", demo_overrides(demo, same_vocab=True, output_dir=out) + [
        "optim.max_steps=3", "checkpoint.every_steps=3", "checkpoint.export_at_end=false", "optim.lr=1.0e-2"],
        ranks=1, port=29540)
    check(result)
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(r["train/ce"]) for r in rows.values())
    assert rows[3]["train/loss"] == pytest.approx(rows[3]["train/ce"])  # sft: CE only
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()


def test_lora_student_with_gradient_checkpointing_trains_and_exports_merged(demo, tmp_path):
    """peft LoRA on the GPT-2 student under ZeRO-3 (frozen head: gradient to its input only); the export folds the
    adapters into plain weights that reproduce the live model's logits."""
    from engine_helpers import demo_overrides, launch, logits_tolerance, metrics
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = launch("configs/tests/tiny_dskd_eta.yaml", demo_overrides(demo, same_vocab=False, output_dir=out) + [
        "optim.max_steps=2", "checkpoint.every_steps=0", "student.lora.enabled=true",
        "student.lora.target_modules=[c_attn]", "student.lora.alpha=32", "student.gradient_checkpointing=true",
        "optim.lr=5.0e-2"], ranks=1, port=29541)
    check(result)
    assert sorted(metrics(out)) == [1, 2]
    probe = torch.load(out / "export" / "probe.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():  # merged weights vs adapters: the same maths summed in another order
        torch.testing.assert_close(model(input_ids=probe["input_ids"]).logits, probe["logits"],
                                   **logits_tolerance(model.config, probe["logits"]))
    base = AutoModelForCausalLM.from_pretrained(demo["student"]).eval()
    with torch.no_grad():  # the adapters did change the model
        assert not torch.allclose(base(input_ids=probe["input_ids"]).logits, probe["logits"], atol=1e-4)


@pytest.mark.timeout(60)  # a guard that never gives up on a lock would hang here, as torch's own wait does
def test_a_stale_jit_build_lock_is_removed_and_a_live_one_is_waited_for(tmp_path):
    import os
    import threading
    import time

    from dskd_scale.engine.distributed import wait_for_build_lock

    wait_for_build_lock(tmp_path / "absent")  # no lock: returns at once

    stale = tmp_path / "stale" / "lock"
    stale.parent.mkdir()
    stale.touch()
    old = time.time() - 700
    os.utime(stale, (old, old))
    with pytest.warns(UserWarning, match="left by a killed build"):
        wait_for_build_lock(stale, stale_after_s=600)
    assert not stale.exists()

    live = tmp_path / "live" / "lock"
    live.parent.mkdir()
    live.touch()
    release = threading.Timer(0.3, live.unlink)  # the building process finishes and removes its lock
    release.start()
    started = time.monotonic()
    wait_for_build_lock(live, stale_after_s=600, poll_s=0.05)
    release.join()
    assert time.monotonic() - started >= 0.25, "returned while the live build still held its lock"
    assert not live.exists()


def test_the_lock_checked_is_the_one_torch_builds_the_shm_op_under(tmp_path, monkeypatch):
    from dskd_scale.engine.distributed import shm_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert shm_op_build_lock() == tmp_path / "deepspeed_shm_comm" / "lock"  # DeepSpeed's name for the op


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shm op is built only without CUDA")
def test_init_distributed_clears_the_build_lock_before_deepspeed_builds_the_op(monkeypatch):
    import importlib

    import deepspeed
    import torch.distributed as dist

    from dskd_scale.engine import distributed

    calls = []

    class Stop(Exception):
        pass

    def deepspeed_init(**_):
        calls.append("deepspeed.init_distributed")
        raise Stop

    monkeypatch.setenv("RANK", "0")  # a launcher's world: no defaults written into os.environ
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "wait_for_build_lock", lambda lock: calls.append(("wait", lock.name)))
    monkeypatch.setattr(deepspeed, "init_distributed", deepspeed_init)
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(comm_torch, "build_shm_op", comm_torch.build_shm_op)  # restored after skip_cpu_shm_op
    with pytest.raises(Stop):
        distributed.init_distributed()
    assert calls == [("wait", "lock"), "deepspeed.init_distributed"]
    calls.clear()
    with pytest.raises(Stop):
        distributed.init_distributed(skip_cpu_shm_op=True)  # no op built: nothing to wait for
    assert calls == ["deepspeed.init_distributed"]
