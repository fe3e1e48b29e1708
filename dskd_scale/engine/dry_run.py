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
DeepSpeed's ZeRO-3 estimator turns the counts into bytes per rank. The teacher is priced three ways: partitioned
(``zero3``), a full copy per rank (``replicated``), and read from a teacher hidden-state cache (``cache``: no
teacher engine, only the frozen teacher head, a full bf16/fp32 copy per rank). When a cache is configured
(``teacher.cache_dir``) or asked for, the rows the cache holds are counted in the training data and priced in
bf16 and fp8. ``docs/scaling.md`` works these numbers for 72B and 7B teachers; ``tools/plan_scale.py`` adds a
FLOP/bandwidth time model on top (assumptions passed as flags, none kept here).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dskd_scale.config.run import PROJECTOR_CRITERIA, EngineConfig, ModelConfig, RunConfig
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
from dskd_scale.teacher_cache import format as cache_format

if TYPE_CHECKING:
    from dskd_scale.data.dataset import PrealignedDataset

TEACHER_PLACEMENTS = ("zero3", "replicated")
TEACHER_SOURCES = (*TEACHER_PLACEMENTS, "cache")  # how the teacher's hidden states reach the losses


def cache_bytes_per_row(hidden_size: int) -> dict[str, int]:
    """Bytes of one cached teacher row on disk per storage dtype (``dskd_scale.teacher_cache.format``): the
    values (bf16 2·E, fp8 e4m3 E), the row's int32 position and, for fp8, its fp32 scale."""
    return {dtype: int(cache_format.bytes_per_row(dtype, hidden_size)) for dtype in cache_format.DTYPES}


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
    """``{"total", "largest_layer", "hidden_size", "head_params"}`` of a transformers config, counted on the meta
    device (tied input/output embeddings count once in ``total``; ``head_params`` is the ``[V, D]`` head either way)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    hidden = int(getattr(model_config, "hidden_size", None) or model_config.n_embd)
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "largest_layer": largest, "hidden_size": hidden, "head_params": head}


def _plan(cfg: RunConfig, student_tokenizer, teacher_tokenizer, *, world_size: int,
          problems: list[str]) -> tuple[dict[str, Any] | None, list[PrealignedDataset]]:
    """Open the data as training does and count the optimizer steps rank 0 will see.

    Also returns the datasets a teacher cache of ``data.train_dir`` covers (a hold-out split of it included).
    """
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
        return None, []
    cached = [train_set] if eval_set is None or cfg.data.eval_dir else [train_set, eval_set]
    return {"train_examples": len(train_set), "eval_examples": 0 if eval_set is None else len(eval_set),
            "world_size": world_size,
            "global_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum * world_size,
            "micro_batches_per_rank_per_epoch": micro_batches,
            "steps_per_epoch": micro_batches // cfg.optim.grad_accum,
            "total_steps": total,
            "total_steps_from": "optim.max_steps" if cfg.optim.max_steps else "optim.epochs x steps_per_epoch"}, cached


def _data_without_tokenizers(cfg: RunConfig, problems: list[str]) -> None:
    """Check shard folders even when a tokenizer could not be loaded (fingerprints need the tokenizers)."""
    for key, path in (("data.train_dir", cfg.data.train_dir), ("data.eval_dir", cfg.data.eval_dir)):
        if not path:
            continue
        try:
            shard_format.verify_shards(path)
        except (OSError, ValueError) as err:
            problems.append(f"{key}={_shown(path)}: {err}")


def estimate_memory(student: dict[str, int], teacher: dict[str, int] | None, engine: EngineConfig, *,
                    projector: bool, teacher_source: str, world_size: int, nodes: int,
                    trainable_head: bool = True) -> dict[str, Any]:
    """Per-rank bytes of the trained engine plus the teacher as each of ``TEACHER_SOURCES``, and the head copies.

    ``student``/``teacher``: ``parameter_counts`` of each model; ``projector``: the criterion trains a t2s projector
    (``D_student x D_teacher``, part of the trained engine); ``teacher_source``: the configured one (zero3,
    replicated or cache); ``trainable_head``: the student head is trained (not frozen by LoRA).

    Beside DeepSpeed's model states, ``engine/heads.py`` keeps full ``[V, D]`` head copies on every rank: the
    teacher head gathered once (a ZeRO-3 teacher; a replicated teacher's own weight is used in place; a cache loads
    the head alone) and each step's student head copy, its one fp32 weight-gradient accumulator and the full-shape
    gradient handed to the engine (``student_head_buffers``). Activations, the loss's chunk buffers and the
    allocator's slack are not included.
    """
    ranks_per_node = world_size // nodes
    memory: dict[str, Any] = {"world_size": world_size, "nodes": nodes, "ranks_per_node": ranks_per_node,
                              "student_params": student["total"]}
    trained = student["total"]
    if teacher is not None:
        memory["teacher_params"] = teacher["total"]
        if projector:
            memory["projector_params"] = student["hidden_size"] * teacher["hidden_size"]
            trained += memory["projector_params"]
    memory["trained_engine"] = estimate_model_state_memory(
        trained, student["largest_layer"], ranks_per_node=ranks_per_node, nodes=nodes,
        offload_optimizer=engine.offload_optimizer != "none", offload_param=engine.offload_param != "none")
    trained_bytes = memory["trained_engine"]["accelerator_bytes_per_rank"]
    bytes_per_param = torch.finfo(torch_dtype(engine.precision)).bits // 8
    # The gathered copy, plus (trained head) the fp32 accumulator and the full-shape gradient at route time.
    head_buffers = student["head_params"] * (bytes_per_param + (4 + bytes_per_param if trainable_head else 0))
    memory["student_head_buffers_bytes_per_rank"] = head_buffers
    if teacher is None:
        memory["model_states_bytes_per_rank"] = trained_bytes
        memory["bytes_per_rank_without_activations"] = trained_bytes + head_buffers
        return memory
    offloaded = engine.teacher_offload_param != "none"
    teacher_head_bytes = teacher["head_params"] * bytes_per_param
    partition = 0 if offloaded else frozen_state_memory(teacher["total"], world_size, bytes_per_param)
    placements = {
        # zero3: each rank holds 1/world of the frozen weights (0 on the accelerator when offloaded), gathers one
        # layer at a time for the forward, and keeps the head gathered once at start-up.
        "zero3": {"bytes_per_rank": partition + teacher_head_bytes, "partition_bytes": partition,
                  "head_copy_bytes": teacher_head_bytes, "teacher_offload_param": engine.teacher_offload_param,
                  "largest_layer_gathered_bytes": teacher["largest_layer"] * bytes_per_param},
        # replicated: every rank holds the whole teacher (its head is used in place).
        "replicated": {"bytes_per_rank": teacher["total"] * bytes_per_param},
        # cache: no teacher engine; the frozen [W, E] teacher head maps cached hidden states to teacher logits.
        "cache": {"bytes_per_rank": teacher_head_bytes, "head_params": teacher["head_params"]},
    }
    memory["teacher_bytes_per_rank"] = placements[teacher_source]["bytes_per_rank"]
    memory["teacher_placement"] = {"configured": teacher_source, **placements}
    memory["model_states_bytes_per_rank"] = {name: trained_bytes + placements[name]["bytes_per_rank"]
                                             for name in TEACHER_SOURCES}
    memory["bytes_per_rank_without_activations"] = {
        name: total + head_buffers for name, total in memory["model_states_bytes_per_rank"].items()}
    return memory


def cache_plan(teacher_hidden_size: int, rows: dict[str, int], *, examples: int, micro_batch_size: int,
               grad_accum: int, world_size: int) -> dict[str, Any]:
    """Size of a teacher hidden-state cache and the bytes a step reads from it, per storage dtype.

    ``rows``: rows of each cache mode of ``tools/cache_teacher.py`` summed over the ``examples`` it covers:
    ``aligned`` (the rows the losses use) and ``all_positions`` (every position predicting a response token: one
    cache for students of any tokenizer). Per-step reads are those of an aligned cache, at the mean rows per
    example.
    """
    per_row = cache_bytes_per_row(teacher_hidden_size)
    examples_per_step = micro_batch_size * grad_accum
    aligned_per_example = rows["aligned"] / max(examples, 1)
    return {
        "teacher_hidden_size": teacher_hidden_size, "bytes_per_row": per_row, "examples": examples, "rows": rows,
        "size_bytes": {dtype: rows["aligned"] * per_row[dtype] for dtype in per_row},
        "size_bytes_all_positions": {dtype: rows["all_positions"] * per_row[dtype] for dtype in per_row},
        "aligned_rows_per_example": round(aligned_per_example, 2),
        "read_bytes_per_step_per_rank": {dtype: round(aligned_per_example * examples_per_step * per_row[dtype])
                                         for dtype in per_row},
        "read_bytes_per_step_all_ranks": {dtype: round(aligned_per_example * examples_per_step * world_size
                                                       * per_row[dtype]) for dtype in per_row},
    }


def _cache_rows(datasets: list[PrealignedDataset]) -> dict[str, int]:
    """Rows a teacher cache holds over ``datasets`` in each mode, counted as
    ``dskd_scale.teacher_cache.writer.cached_positions`` selects them (not imported: it pulls in prealign/)."""
    aligned = all_positions = 0
    for dataset in datasets:
        for i in range(len(dataset)):  # one numpy reduction per example; a dry run only
            example = dataset[i]
            aligned += len(example["align_teacher"])
            supervised = np.flatnonzero(example["teacher_labels"] != shard_format.IGNORE_INDEX)
            if supervised.size:  # positions first_label - 1 .. L - 2
                all_positions += len(example["teacher_labels"]) - 1 - max(int(supervised[0]) - 1, 0)
    return {"aligned": aligned, "all_positions": all_positions}


def describe_run(cfg: RunConfig, *, world_size: int, nodes: int = 1, plan_cache: bool = False) -> dict[str, Any]:
    """Check every input of the run, then its DS configs, step plan and per-rank memory for ``world_size`` ranks.

    With ``teacher.cache_dir`` set or ``plan_cache``, also ``"teacher_cache"``: the size of a teacher hidden-state
    cache of ``data.train_dir`` and the bytes a step reads from it (``cache_plan``); otherwise that key is None.

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
        # a cached run builds no teacher engine (engine/build.py), so it has no teacher DeepSpeed config
        ds_configs["teacher_ds_config"] = (teacher_ds_config(cfg.engine, cfg.data.micro_batch_size)
                                           if cfg.needs_teacher and not getattr(cfg.teacher, "cache_dir", "")
                                           else None)
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
    cache_dir = getattr(cfg.teacher, "cache_dir", "")
    if cfg.needs_teacher and cache_dir and not Path(cache_dir).expanduser().is_dir():
        problems.append(f"teacher.cache_dir={_shown(cache_dir)}: no such folder (write it with tools/cache_teacher.py)")

    plan, cached_sets = None, []
    tokenizers_ok = student_tokenizer is not None and (teacher_tokenizer is not None
                                                       or not uses_teacher_tokenizer(cfg))
    if tokenizers_ok:
        plan, cached_sets = _plan(cfg, student_tokenizer, teacher_tokenizer, world_size=world_size,
                                  problems=problems)
    else:
        _data_without_tokenizers(cfg, problems)
    opened_cache = None
    if cfg.needs_teacher and cache_dir and teacher_config is not None and Path(cache_dir).expanduser().is_dir():
        from dskd_scale.data.dataset import DataError
        from dskd_scale.train_setup import open_teacher_cache

        try:  # the checks training makes: complete, same teacher and data fingerprints, same hidden size
            opened_cache = open_teacher_cache(cfg).cache
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DryRunError(problems)

    student = parameter_counts(student_config)
    teacher = parameter_counts(teacher_config) if cfg.needs_teacher else None
    source = "cache" if cache_dir else cfg.teacher.placement
    memory = estimate_memory(student, teacher, cfg.engine, projector=cfg.kd.criterion in PROJECTOR_CRITERIA,
                             teacher_source=source, world_size=world_size, nodes=nodes,
                             trainable_head=not cfg.student.lora.enabled)
    teacher_cache = None
    if teacher is not None and (cache_dir or plan_cache):
        teacher_cache = cache_plan(teacher["hidden_size"], _cache_rows(cached_sets),
                                   examples=sum(len(dataset) for dataset in cached_sets),
                                   micro_batch_size=cfg.data.micro_batch_size, grad_accum=cfg.optim.grad_accum,
                                   world_size=world_size)
        if opened_cache is not None:  # what teacher.cache_dir holds, as its manifest says
            teacher_cache["configured"] = {"folder": str(opened_cache.folder), "mode": opened_cache.mode,
                                           "dtype": opened_cache.dtype, "examples": opened_cache.num_examples,
                                           "bytes_per_row": opened_cache.bytes_per_row()}
    return {**ds_configs, "plan": plan, "memory": memory, "teacher_cache": teacher_cache}
