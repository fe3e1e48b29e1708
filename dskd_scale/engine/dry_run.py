"""``launch/train.py --dry-run``: the generated DeepSpeed configs and a per-rank model-state memory estimate.

No process group, no weights: models are instantiated on the ``meta`` device to count parameters, and
DeepSpeed's ZeRO-3 estimator turns the counts into bytes per rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dskd_scale.config.run import PROJECTOR_CRITERIA, ModelConfig, RunConfig
from dskd_scale.engine.ds_config import (
    estimate_model_state_memory,
    frozen_state_memory,
    student_ds_config,
    teacher_ds_config,
    torch_dtype,
)
from dskd_scale.models.build import load_tokenizer, random_model_config


def parameter_counts(cfg: ModelConfig, key: str) -> dict[str, int]:
    """``{"total", "largest_layer", "hidden_size"}`` of the model ``cfg`` describes, counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.architecture:
        config = random_model_config(cfg, load_tokenizer(cfg.tokenizer_path, key=f"{key}.tokenizer"))
    else:
        config = AutoConfig.from_pretrained(cfg.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    return {"total": total, "largest_layer": largest, "hidden_size": hidden}


def describe_run(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    """DS configs of both engines and the per-rank memory estimate for ``world_size`` ranks."""
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    nodes = max(world_size // max(ranks_per_node, 1), 1)
    student = parameter_counts(cfg.student, "student")
    report: dict[str, Any] = {
        "student_ds_config": student_ds_config(cfg.engine, cfg.optim, cfg.data.micro_batch_size),
        "teacher_ds_config": teacher_ds_config(cfg.engine, cfg.data.micro_batch_size) if cfg.needs_teacher else None,
    }
    trained = student["total"]
    memory: dict[str, Any] = {"world_size": world_size, "student_params": student["total"]}
    if cfg.needs_teacher:
        teacher = parameter_counts(cfg.teacher, "teacher")
        memory["teacher_params"] = teacher["total"]
        if cfg.kd.criterion in PROJECTOR_CRITERIA:
            memory["projector_params"] = student["hidden_size"] * teacher["hidden_size"]
            trained += memory["projector_params"]
        bytes_per_param = torch.finfo(torch_dtype(cfg.engine.precision)).bits // 8
        memory["teacher_bytes_per_rank"] = frozen_state_memory(teacher["total"], world_size, bytes_per_param)
    memory["trained_engine"] = estimate_model_state_memory(
        trained, student["largest_layer"], ranks_per_node=ranks_per_node, nodes=nodes,
        offload_optimizer=cfg.engine.offload_optimizer != "none", offload_param=cfg.engine.offload_param != "none")
    report["memory"] = memory
    return report
