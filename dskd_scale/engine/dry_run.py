"""``launch/train.py --dry-run``: a pre-flight check of a run, then its plan and a per-rank memory estimate.

The check opens everything the run will open before any GPU is allocated: both tokenizers, the model folders'
``config.json``, the prealigned shard folders (manifest, sha256 of every shard, the tokenizer fingerprints the
shards were built with, the same checks training makes), the ZeRO tuning file and the other files the config
names. Every problem is collected, so one run lists them all (``DryRunError``), each with its config key and
the path as resolved.

Relative paths are resolved against the current working directory, exactly as training resolves them (the same
rule as for command-line overrides, and ``sbatch`` jobs start in the submit directory). Messages show the
absolute path so a run started from the wrong folder is obvious.

No process group, no weights: models are instantiated on the ``meta`` device to count parameters, and
DeepSpeed's ZeRO-3 estimator turns the counts into bytes per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dskd_scale.config.run import PROJECTOR_CRITERIA, ModelConfig, RunConfig
from dskd_scale.data import format as shard_format
from dskd_scale.engine.ds_config import (
    DeepSpeedConfigError,
    estimate_model_state_memory,
    frozen_state_memory,
    load_zero_tuning,
    student_ds_config,
    teacher_ds_config,
    torch_dtype,
)
from dskd_scale.models.build import load_tokenizer, random_model_config

TEACHER_PLACEMENTS = ("zero3", "replicated")


class DryRunError(ValueError):
    """Every problem the pre-flight check found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        header = (f"dry run: {len(self.problems)} problem(s) (relative paths are resolved against the current "
                  f"directory {Path.cwd()}):")
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def _shown(path: str) -> str:
    """``path`` as written, plus its absolute form when it was relative."""
    resolved = Path(path).expanduser().absolute()
    return path if str(resolved) == path else f"{path} (= {resolved})"


def _model_config(cfg: ModelConfig, role: str, tokenizer: Any, problems: list[str]):
    """The transformers config of a model (random build or ``path/config.json``), or None after a problem."""
    from transformers import AutoConfig

    if cfg.architecture:
        return None if tokenizer is None else random_model_config(cfg, tokenizer)
    folder = Path(cfg.path).expanduser()
    if folder.exists() and not (folder / "config.json").is_file():
        problems.append(f"{role}.path={_shown(cfg.path)}: no config.json in this folder (expected a Hugging Face "
                        "model folder)")
        return None
    try:  # a local folder, or a Hub id already in the local Hugging Face cache (a pre-flight check never downloads)
        return AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/HF errors; report them all
        reason = ("no such folder (nor a Hub id in the local Hugging Face cache)" if not folder.exists()
                  else str(err).splitlines()[0])
        problems.append(f"{role}.path={_shown(cfg.path)}: {reason}")
        return None


def _tokenizer(cfg: ModelConfig, role: str, problems: list[str]):
    from dskd_scale.train_setup import tokenizer_key

    key = tokenizer_key(cfg, role)
    try:
        return load_tokenizer(cfg.tokenizer_path, key=key)
    except Exception as err:  # noqa: BLE001 - a missing folder, a folder without tokenizer files, a bad file
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if message.startswith(f"{key}:"):
            message = message[len(key) + 1:].strip()
        problems.append(f"{key}={_shown(cfg.tokenizer_path)}: cannot load a tokenizer: {message}")
        return None


def _file(path: str, key: str, problems: list[str]) -> None:
    if path and not Path(path).expanduser().is_file():
        problems.append(f"{key}={_shown(path)}: no such file")


def parameter_counts(model_config: Any) -> dict[str, int]:
    """``{"total", "largest_layer", "hidden_size"}`` of a transformers config, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    hidden = int(getattr(model_config, "hidden_size", None) or model_config.n_embd)
    return {"total": total, "largest_layer": largest, "hidden_size": hidden}


def _plan(cfg: RunConfig, student_tokenizer, teacher_tokenizer, *, world_size: int,
          problems: list[str]) -> dict[str, Any] | None:
    """Open the data as training does and count the optimizer steps rank 0 will see."""
    from dskd_scale.data.dataset import DataError
    from dskd_scale.train_setup import open_run_data, run_train_loader, total_optimizer_steps

    try:
        train_set, eval_set = open_run_data(cfg, student_tokenizer, teacher_tokenizer)
        micro_batches = len(run_train_loader(cfg, train_set, rank=0, world_size=world_size))
        total = total_optimizer_steps(cfg, micro_batches)
    except (DataError, OSError, ValueError) as err:
        message = str(err)
        problems.append(message if message.startswith("data.") else f"data.train_dir={_shown(cfg.data.train_dir)}: "
                        f"{message}")
        return None
    return {"train_examples": len(train_set), "eval_examples": 0 if eval_set is None else len(eval_set),
            "world_size": world_size,
            "global_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum * world_size,
            "micro_batches_per_rank_per_epoch": micro_batches,
            "steps_per_epoch": micro_batches // cfg.optim.grad_accum,
            "total_steps": total,
            "total_steps_from": "optim.max_steps" if cfg.optim.max_steps else "optim.epochs x steps_per_epoch"}


def _data_without_tokenizers(cfg: RunConfig, problems: list[str]) -> None:
    """Check shard folders even when a tokenizer could not be loaded (fingerprints need the tokenizers)."""
    for key, path in (("data.train_dir", cfg.data.train_dir), ("data.eval_dir", cfg.data.eval_dir)):
        if not path:
            continue
        try:
            shard_format.verify_shards(path)
        except (OSError, ValueError) as err:
            problems.append(f"{key}={_shown(path)}: {err}")


def _memory(cfg: RunConfig, student: dict[str, int], teacher: dict[str, int] | None, *, world_size: int,
            nodes: int) -> dict[str, Any]:
    ranks_per_node = world_size // nodes
    memory: dict[str, Any] = {"world_size": world_size, "nodes": nodes, "ranks_per_node": ranks_per_node,
                              "student_params": student["total"]}
    trained = student["total"]
    if teacher is not None:
        memory["teacher_params"] = teacher["total"]
        if cfg.kd.criterion in PROJECTOR_CRITERIA:
            memory["projector_params"] = student["hidden_size"] * teacher["hidden_size"]
            trained += memory["projector_params"]
    memory["trained_engine"] = estimate_model_state_memory(
        trained, student["largest_layer"], ranks_per_node=ranks_per_node, nodes=nodes,
        offload_optimizer=cfg.engine.offload_optimizer != "none", offload_param=cfg.engine.offload_param != "none")
    if teacher is not None:
        bytes_per_param = torch.finfo(torch_dtype(cfg.engine.precision)).bits // 8
        offloaded = cfg.engine.teacher_offload_param != "none"
        zero3 = 0 if offloaded else frozen_state_memory(teacher["total"], world_size, bytes_per_param)
        replicated = teacher["total"] * bytes_per_param
        placement = getattr(cfg.teacher, "placement", "zero3")
        memory["teacher_bytes_per_rank"] = zero3 if placement == "zero3" else replicated
        memory["teacher_placement"] = {
            "configured": placement,
            # zero3: each rank holds 1/world of the frozen weights (0 on the accelerator when offloaded) and
            # gathers one layer at a time for the forward; replicated: every rank holds the whole teacher.
            "zero3": {"bytes_per_rank": zero3, "teacher_offload_param": cfg.engine.teacher_offload_param,
                      "largest_layer_gathered_bytes": teacher["largest_layer"] * bytes_per_param},
            "replicated": {"bytes_per_rank": replicated},
        }
        trained_bytes = memory["trained_engine"]["accelerator_bytes_per_rank"]
        memory["model_states_bytes_per_rank"] = {
            name: trained_bytes + memory["teacher_placement"][name]["bytes_per_rank"] for name in TEACHER_PLACEMENTS}
    else:
        memory["model_states_bytes_per_rank"] = memory["trained_engine"]["accelerator_bytes_per_rank"]
    return memory


def describe_run(cfg: RunConfig, *, world_size: int, nodes: int = 1) -> dict[str, Any]:
    """Check every input of the run, then its DS configs, step plan and per-rank memory for ``world_size`` ranks.

    Raises:
        DryRunError: listing every problem found (path, config key), not only the first.
    """
    problems: list[str] = []
    if world_size < 1 or nodes < 1 or world_size % nodes:
        problems.append(f"--world-size {world_size} / --nodes {nodes}: the world size must be a positive multiple "
                        "of the number of nodes")
        nodes = 1 if world_size < 1 or nodes < 1 or world_size % nodes else nodes
        world_size = max(world_size, 1)
    student_tokenizer = _tokenizer(cfg.student, "student", problems)
    student_config = _model_config(cfg.student, "student", student_tokenizer, problems)
    teacher_tokenizer = teacher_config = None
    from dskd_scale.train_setup import uses_teacher_tokenizer

    if uses_teacher_tokenizer(cfg):
        teacher_tokenizer = _tokenizer(cfg.teacher, "teacher", problems)
    if cfg.needs_teacher:
        teacher_config = _model_config(cfg.teacher, "teacher", teacher_tokenizer, problems)
    for role, model, tokenizer, config in (("student", cfg.student, student_tokenizer, student_config),
                                           ("teacher", cfg.teacher, teacher_tokenizer, teacher_config)):
        vocab = getattr(config, "vocab_size", None)
        if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
            from dskd_scale.train_setup import tokenizer_key

            problems.append(f"{tokenizer_key(model, role)}={_shown(model.tokenizer_path)}: {len(tokenizer)} tokens, "
                            f"more than the {vocab} rows of {role}.path's embedding; this is not the model's "
                            "tokenizer")
    ds_configs: dict[str, Any] = {}
    try:
        load_zero_tuning(cfg.engine.zero_tuning)
        ds_configs["student_ds_config"] = student_ds_config(cfg.engine, cfg.optim, cfg.data.micro_batch_size)
        ds_configs["teacher_ds_config"] = (teacher_ds_config(cfg.engine, cfg.data.micro_batch_size)
                                           if cfg.needs_teacher else None)
    except DeepSpeedConfigError as err:
        message = str(err)
        if cfg.engine.zero_tuning and not Path(cfg.engine.zero_tuning).expanduser().is_file():
            message = f"engine.zero_tuning={_shown(cfg.engine.zero_tuning)}: no such file"
        problems.append(message)
    if cfg.kd.criterion == "mined":
        _file(cfg.kd.mined_map, "kd.mined_map", problems)
    if cfg.kd.projector_init == "file":
        _file(cfg.kd.projector_init_file, "kd.projector_init_file", problems)
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).expanduser().exists():
        problems.append(f"checkpoint.resume={_shown(cfg.checkpoint.resume)}: no such checkpoint folder")
    if "nvme" in (cfg.engine.offload_optimizer, cfg.engine.offload_param, cfg.engine.teacher_offload_param) \
            and not Path(cfg.engine.nvme_path).is_dir():
        problems.append(f"engine.nvme_path={_shown(cfg.engine.nvme_path)}: no such folder (needed for nvme offload)")
    output = Path(cfg.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        problems.append(f"output_dir={_shown(cfg.output_dir)}: exists and is not a folder")

    plan = None
    tokenizers_ok = student_tokenizer is not None and (teacher_tokenizer is not None
                                                       or not uses_teacher_tokenizer(cfg))
    if tokenizers_ok:
        plan = _plan(cfg, student_tokenizer, teacher_tokenizer, world_size=world_size, problems=problems)
    else:
        _data_without_tokenizers(cfg, problems)
    if problems:
        raise DryRunError(problems)

    student = parameter_counts(student_config)
    teacher = parameter_counts(teacher_config) if cfg.needs_teacher else None
    return {**ds_configs, "plan": plan,
            "memory": _memory(cfg, student, teacher, world_size=world_size, nodes=nodes)}
