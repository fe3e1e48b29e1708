"""The DeepSpeed config dict, built in code from the run config (one source of truth, aesthetics P7).

``configs/deepspeed/*.json`` (``engine.zero_tuning``) may only hold ZeRO tuning knobs (bucket sizes,
prefetch, persistence threshold, aio). Batch, accumulation, clipping, optimizer, scheduler, precision,
stage and offload come from the run config; the builder refuses a JSON that sets them instead of
silently overwriting them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dskd_scale.config.run import EngineConfig, OptimConfig

ALLOWED_TOP_LEVEL = frozenset({"zero_optimization", "aio", "comms_logger", "activation_checkpointing"})
# Keys owned by the run config, refused inside zero_optimization of a tuning file.
RUN_OWNED_ZERO_KEYS = frozenset({"stage", "offload_optimizer", "offload_param"})


class DeepSpeedConfigError(ValueError):
    """A ZeRO tuning file sets something the run config owns, or is not valid JSON."""


def load_zero_tuning(path: str) -> dict:
    """Read a tuning JSON, refusing batch/GA/optimizer/precision/stage/offload fields (named with the file)."""
    if not path:
        return {}
    file = Path(path)
    try:
        tuning = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise DeepSpeedConfigError(f"engine.zero_tuning: {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(tuning, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object")
    problems = [f"{path}: '{key}' is set by the run config (data/optim/engine sections), not a tuning file"
                for key in tuning if key not in ALLOWED_TOP_LEVEL]
    zero = tuning.get("zero_optimization", {})
    problems += [f"{path}: 'zero_optimization.{key}' comes from engine.zero_stage/engine.offload_*; remove it"
                 for key in zero if key in RUN_OWNED_ZERO_KEYS]
    if problems:
        raise DeepSpeedConfigError("refusing the ZeRO tuning file:\n  " + "\n  ".join(problems))
    return tuning


def _offload(device: str, engine: EngineConfig) -> dict | None:
    if device == "none":
        return None
    entry = {"device": device, "pin_memory": torch.cuda.is_available()}
    if device == "nvme":
        entry["nvme_path"] = engine.nvme_path
    return entry


def _base(engine: EngineConfig, micro_batch_size: int, grad_accum: int, offload_param: str) -> dict:
    tuning = load_zero_tuning(engine.zero_tuning)
    zero = dict(tuning.get("zero_optimization", {}))
    zero["stage"] = engine.zero_stage
    if engine.zero_stage == 3:
        # Export and the in-run HF folder gather 16-bit weights on save.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        if (param_offload := _offload(offload_param, engine)) is not None:
            zero["offload_param"] = param_offload
    config = {key: copy.deepcopy(value) for key, value in tuning.items() if key != "zero_optimization"}
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # the loop logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
    })
    if engine.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


def student_ds_config(engine: EngineConfig, optim: OptimConfig, micro_batch_size: int) -> dict:
    """The trained engine's DS dict (student + projectors); LR groups come from ``model_parameters``."""
    config = _base(engine, micro_batch_size, optim.grad_accum, engine.offload_param)
    config["gradient_clipping"] = optim.grad_clip
    on_cpu = not torch.cuda.is_available()
    adam = {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
            "weight_decay": optim.weight_decay}
    optimizer_offload = _offload(engine.offload_optimizer, engine)
    # optim.adam_impl; torch AdamW on CPU always: DeepSpeed's FusedAdam/CPUAdam would JIT-compile for ~70 s there.
    deepspeed_adam = optim.adam_impl == "deepspeed" or (optim.adam_impl == "auto" and optimizer_offload is not None)
    torch_adam = on_cpu or not deepspeed_adam
    if torch_adam:
        adam["torch_adam"] = True
    config["optimizer"] = {"type": "AdamW", "params": adam}
    if optimizer_offload is not None:
        config["zero_optimization"]["offload_optimizer"] = optimizer_offload
        if torch_adam:  # DeepSpeed otherwise insists on its CPUAdam for an offloaded optimizer
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def teacher_ds_config(engine: EngineConfig, micro_batch_size: int) -> dict:
    """The frozen teacher's DS dict: ZeRO partitioned, no optimizer, optional parameter offload."""
    return _base(engine, micro_batch_size, 1, engine.teacher_offload_param)


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def estimate_model_state_memory(total_params: int, largest_layer_params: int, *, ranks_per_node: int,
                                nodes: int, offload_optimizer: bool, offload_param: bool) -> dict[str, int]:
    """DeepSpeed's ZeRO-3 estimate of per-rank model-state bytes (params + grads + Adam states)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu_bytes, gpu_bytes, largest_layer_bytes = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, num_gpus_per_node=ranks_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer or offload_param, cpu_offload_params=offload_param, zero_init=True)
    return {"cpu_bytes_per_node": cpu_bytes, "accelerator_bytes_per_rank": gpu_bytes,
            "largest_layer_bytes": largest_layer_bytes}


def frozen_state_memory(total_params: int, world: int, bytes_per_param: int) -> int:
    """Per-rank bytes of a frozen ZeRO-3 teacher: its partition only (no grads, no optimizer states)."""
    return -(-total_params // max(world, 1)) * bytes_per_param
