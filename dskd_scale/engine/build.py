"""Build the two DeepSpeed engines: the frozen teacher (no optimizer) and the trained student + projectors.

Under ZeRO-3 both models are constructed while a ``HfDeepSpeedConfig`` is alive, so transformers loads
them partitioned (``zero.Init``): no rank ever holds a full teacher. With ``teacher.placement=replicated`` the
teacher is instead a full frozen copy on every rank, outside DeepSpeed (no per-step gathers).

Projector ideal initialisation runs once, before ``deepspeed.initialize``, inside one gather of the overlap
rows of both heads, in fp32; rank 0 computes and broadcasts so every rank starts identical. A ZeRO-3 engine
needs one dtype for all its parameters, so under bf16 the projectors (and any other fp32 trainable, e.g.
peft's upcast LoRA adapters) are cast to bf16 for the engine and, once the optimizer exists, their fp32
master weights are overwritten with the fp32 values: training starts from the exact initialisation, not
from its bf16 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dskd_scale.config.run import EngineConfig, KDConfig, ModelConfig, OptimConfig
from dskd_scale.engine.distributed import device, rank, world_size
from dskd_scale.engine.ds_config import student_ds_config, teacher_ds_config, torch_dtype
from dskd_scale.engine.heads import StudentHead, full_copy, gathered, linear_head
from dskd_scale.models.build import (
    ModelBuildError,
    apply_lora,
    build_causal_lm,
    causal_lm_of,
    head_of,
    hidden_size_of,
    load_tokenizer,
    no_decay,
)
from dskd_scale.models.wrappers import DistillStudent, TeacherBody
from dskd_scale.projectors import LearnedS2TMap, PinvS2TMap, T2SProjector
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class Engines:
    """Everything the loop drives. ``teacher`` is None for ``sft``; projector fields None outside DSKD."""

    student: Any
    teacher: Any | None
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    student_ds_config: dict
    teacher_ds_config: dict | None
    teacher_head: Any | None = None  # callable h_NE -> logits_NW (frozen)
    student_head: StudentHead | None = None
    s2t_map: Any | None = None  # PinvS2TMap or LearnedS2TMap (a module of the student engine) or None
    teacher_to_student_ids: Tensor | None = None  # [W] int64, -1 where no student token
    baseline_resources: Any | None = None  # losses.baselines.BaselineResources (vanilla_kd, uld, mined, dskd_cma)
    keepalive: list = field(default_factory=list)

    @property
    def student_module(self) -> DistillStudent:
        return self.student.module

    def backward(self, loss: Tensor) -> None:
        """``engine.backward``, then the head gradient is routed to its parameter and reduced once.

        ZeRO-3: the parameter's hook was told to wait (``ds_grad_is_ready=False``), so its gradient is reduced
        here, after the routed leaf gradients were added. ZeRO-0/1: DeepSpeed's post-backward all-reduce is
        switched off at build time and run here, after the routing.
        """
        engine = self.student
        engine.backward(loss)
        routed = self.student_head.route_gradients()
        param = self.student_head.parameter
        if engine.zero_optimization_partition_gradients():
            if routed or param.grad is not None:
                param.ds_grad_is_ready = True
                engine.optimizer.reduce_ready_partitions_and_remove_grads(param)
                param.ds_grad_is_ready = False
            engine.optimizer.overlapping_partition_gradients_reduce_epilogue()
        else:
            engine.allreduce_gradients()

    def trainable_student_head(self):
        """This micro-batch's trainable head callable (a leaf of the step's gathered copy)."""
        return self.student_head.trainable_head()


class ReplicatedTeacher:
    """A full frozen teacher on this rank's device (``teacher.placement=replicated``), outside DeepSpeed.

    It offers what the loop uses of the teacher engine (call -> last hidden ``[B, T, E]``, ``module``,
    ``eval``). No optimizer, no partitioning: its forward issues no collective, which costs a full copy of
    the weights (in the run's precision) on every rank.
    """

    def __init__(self, body: TeacherBody):
        self.module = body.to(device()).eval()

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.module(input_ids, attention_mask)

    def eval(self) -> ReplicatedTeacher:
        self.module.eval()
        return self


def cast_for_engine(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """Cast the not-yet-partitioned parameters of ``module`` that are not ``dtype`` to it (ZeRO-3 needs one dtype).

    Returns their values before the cast (fp32 copies by parameter name) for ``start_master_weights_from``.
    Parameters that ZeRO-3 already partitioned at load time have the load dtype and are left alone.
    """
    originals = {}
    for name, param in module.named_parameters():
        if param.dtype == dtype or hasattr(param, "ds_id"):
            continue
        originals[name] = param.detach().to(torch.float32, copy=True)
        param.data = param.data.to(dtype)
    return originals


def start_master_weights_from(engine, originals: dict[str, Tensor]) -> None:
    """Overwrite the optimizer's fp32 master copy of each named parameter with its fp32 value.

    DeepSpeed builds the master weights from the low-precision parameters (a bf16 rounding of, e.g., the
    pseudo-inverse projector initialisation); ``safe_set_full_fp32_param`` writes each rank's partition from
    the full fp32 value. Collective-free and identical on every rank (the values were broadcast before).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    if not originals:
        return
    for name, param in engine.module.named_parameters():
        if name not in originals or not param.requires_grad:
            continue
        value = originals[name].to(device())
        if hasattr(param, "ds_id"):
            _set_zero3_master(param, value)
        else:
            safe_set_full_fp32_param(param, value)


def _set_zero3_master(param: nn.Parameter, value: Tensor) -> None:
    """``safe_set_full_fp32_param`` for a ZeRO-3 parameter, also when its last partition is padded.

    DeepSpeed (0.19) slices ``value`` at ``rank * partition_numel`` for ``partition_numel`` elements, which runs
    past the end on the last rank when ``ds_numel`` is not a multiple of the partition count (e.g. 4096 x 4096
    over 24 ranks). That case writes the valid part of this rank's partition the same way (padding untouched).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    optimizer = param._z3_optimizer
    flat = value.reshape(-1)
    partition_rank = optimizer._get_param_partition_rank(param)
    partition_numel = param.partition_numel()
    if (partition_rank + 1) * partition_numel <= flat.numel():
        safe_set_full_fp32_param(param, value)
        return
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    begin = min(partition_rank * partition_numel, flat.numel())
    valid = flat.numel() - begin
    partition.data[:valid].copy_(flat[begin:])
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


def lr_lambda(optim: OptimConfig, total_steps: int, base_lr: float):
    """Multiplier of ``base_lr`` at optimizer step ``s``: linear warm-up, then cosine/linear decay to ``min_lr``.

    Unlike the anchor (bug 29), warm-up applies to every schedule. Passed to DeepSpeed as a callable so
    each param group keeps its own base LR (student vs projector).
    """
    floor = min(optim.min_lr / base_lr, 1.0)
    warmup = optim.warmup_steps
    decay_steps = max(total_steps - warmup, 1)

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / decay_steps, 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return multiplier


def param_groups(module: DistillStudent, optim: OptimConfig) -> list[dict]:
    """Student decay / no-decay groups and one projector group with its own LR. Every trainable param once."""
    decay, plain, projector = [], [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("t2s_projector.", "s2t_projector.", "cma_projectors.")):
            projector.append(param)
        elif no_decay(name, param):
            plain.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "student", "params": decay, "lr": optim.lr, "weight_decay": optim.weight_decay},
        {"name": "student_no_decay", "params": plain, "lr": optim.lr, "weight_decay": 0.0},
        {"name": "projector", "params": projector, "lr": optim.projector_lr, "weight_decay": optim.weight_decay},
    ]
    return [group for group in groups if group["params"]]


def defer_head_gradient(weight: nn.Parameter) -> None:
    """Make ZeRO-3 reduce the student head's gradient once per backward instead of once per use.

    A tied head is also the input embedding, whose module call accumulates into the same ``.grad``, and the
    routed chunk gradients arrive after the backward; ZeRO would otherwise reduce a partial gradient. With
    ``ds_grad_is_ready = False`` (DeepSpeed's switch for tiled computations) the hook leaves the gradient
    to accumulate in ``.grad``; ``Engines.backward`` then reduces it once.
    """
    weight.ds_grad_is_ready = False


def _broadcast_from_rank0(tensor: Tensor) -> Tensor:
    if world_size() > 1:
        moved = tensor.to(device())
        dist.broadcast(moved, src=0)
        tensor.copy_(moved.to(tensor.device))
    return tensor


def _overlap_ids(vocab_map: dict[str, np.ndarray], student_vocab: int, teacher_vocab: int) -> tuple[Tensor, Tensor]:
    student_ids = torch.as_tensor(vocab_map["overlap_student_ids"], dtype=torch.long)
    teacher_ids = torch.as_tensor(vocab_map["overlap_teacher_ids"], dtype=torch.long)
    if student_ids.numel() == 0:
        raise ValueError("vocab_map.safetensors: overlap_student_ids is empty; no projector initialisation possible")
    if int(student_ids.max()) >= student_vocab or int(teacher_ids.max()) >= teacher_vocab:
        raise ValueError("vocab_map.safetensors: overlap ids exceed the model heads; were the shards made with "
                         "these tokenizers?")
    return student_ids, teacher_ids


def _init_projectors(kd: KDConfig, student: nn.Module, teacher_head: nn.Module, t2s: T2SProjector | None,
                     s2t_learned: LearnedS2TMap | None, overlap: tuple[Tensor, Tensor]) -> PinvS2TMap | None:
    """Gather both heads once; init the t2s projector / learned s2t map; build the pinv s2t map."""
    student_ids, teacher_ids = overlap
    student_head = head_of(student)
    with gathered([student_head.weight, teacher_head.weight]):
        student_rows_OD = student_head.weight.detach()[student_ids].float()
        teacher_rows_OE = teacher_head.weight.detach()[teacher_ids].float()
        s2t_map = PinvS2TMap(teacher_rows_OE, student_ids) if kd.s2t_map == "pinv" else None
        for projector, init in ((t2s, "init_ideal_"), (s2t_learned, "init_pinv_")):
            if projector is None or kd.projector_init != "pinv":
                continue
            if rank() == 0:
                getattr(projector, init)(student_rows_OD, teacher_rows_OE)
            _broadcast_from_rank0(projector.weight.data)
    if kd.projector_init == "file":
        from safetensors.torch import load_file

        state = load_file(kd.projector_init_file)
        for name, projector in (("t2s_projector", t2s), ("s2t_projector", s2t_learned)):
            key = f"{name}.weight"
            if projector is not None:
                if key not in state:
                    raise ValueError(f"kd.projector_init_file: {kd.projector_init_file} has no {key!r}")
                projector.weight.data.copy_(state[key])
    if kd.projector_init == "random" and t2s is not None:  # same random init on every rank
        _broadcast_from_rank0(t2s.weight.data)
    return s2t_map


def _frozen_teacher_head(cfg: ModelConfig, *, dtype: torch.dtype) -> nn.Linear:
    """The teacher's LM head alone, read from its safetensors (``teacher.cache_dir``: no teacher is built).

    The tensor's name comes from a weightless (meta-device) skeleton of the model: the head's own name, or the
    input embedding's when the two are tied, with or without the base-model prefix some checkpoints omit.
    Every rank reads the ``[W, E]`` rows (one full copy per rank, as the live path's gathered head).
    """
    import json
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(cfg.path)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head_weight = skeleton.get_output_embeddings().weight
    names = [name for name, param in skeleton.named_parameters(remove_duplicate=False) if param is head_weight]
    prefix = f"{skeleton.base_model_prefix}."
    names += [name[len(prefix):] for name in names if name.startswith(prefix)]
    index = folder / "model.safetensors.index.json"
    files = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {name: "model.safetensors" for name in names})
    for name in names:
        path = folder / files.get(name, "")
        if name in files and path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                if name in handle.keys():
                    weight = handle.get_tensor(name).to(dtype)
                    break
    else:
        raise ModelBuildError(f"teacher.path={cfg.path}: no safetensors tensor {' or '.join(names)} (the LM head) "
                              "found; teacher.cache_dir loads only the head, from model.safetensors[.index.json]")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def _baseline_resources(kd: KDConfig, student_tokenizer, teacher_tokenizer, teacher_engine):
    """Tokenizer lengths, the MinED map, and a frozen teacher input-embedding copy for CMA."""
    import torch.nn.functional as F

    from dskd_scale.losses.baselines import BaselineResources

    resources = BaselineResources(student_vocab_size=len(student_tokenizer), teacher_vocab_size=len(teacher_tokenizer))
    if kd.criterion == "mined":
        from dskd_scale.alignment.mined import load_mined_map

        resources.mined = load_mined_map(kd.mined_map)[0]
    if kd.criterion == "dskd_cma":
        embedding = full_copy(causal_lm_of(teacher_engine.module.teacher).get_input_embeddings().weight)
        resources.teacher_embed = lambda ids: F.embedding(ids, embedding)
    return resources


def build_engines(*, student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, kd: KDConfig, optim: OptimConfig,
                  engine_cfg: EngineConfig, micro_batch_size: int, total_steps: int,
                  vocab_map: dict[str, np.ndarray] | None, needs_projectors: bool,
                  student_tokenizer=None, teacher_tokenizer=None) -> Engines:
    """Build models (partitioned at load under ZeRO-3), projectors and both engines.

    Tokenizers are loaded from the model configs unless given (the caller usually has them already).
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # An HfDeepSpeedConfig of an earlier run in this process (benchmarks, tests) must not decide whether this
    # run's models are partitioned at load (a replicated teacher or a ZeRO-0 run would come out partitioned).
    unset_hf_deepspeed_config()
    dtype = torch_dtype(engine_cfg.precision)
    s_config = student_ds_config(engine_cfg, optim, micro_batch_size)
    replicated = teacher_cfg is not None and teacher_cfg.placement == "replicated"
    cached = teacher_cfg is not None and bool(teacher_cfg.cache_dir)  # the hidden states come with the batches
    live_zero = teacher_cfg is not None and not replicated and not cached
    t_config = teacher_ds_config(engine_cfg, micro_batch_size) if live_zero else None
    keepalive: list = []
    student_tokenizer = student_tokenizer or load_tokenizer(student_cfg.tokenizer_path, key="student.tokenizer")
    teacher = teacher_head_module = None
    if teacher_cfg is not None:
        teacher_tokenizer = teacher_tokenizer or load_tokenizer(teacher_cfg.tokenizer_path, key="teacher.tokenizer")
    if cached:
        teacher_head_module = _frozen_teacher_head(teacher_cfg, dtype=dtype)
    elif teacher_cfg is not None:
        if engine_cfg.zero_stage == 3 and not replicated:
            keepalive.append(HfDeepSpeedConfig(t_config))  # from_pretrained/from_config -> zero.Init
        teacher = build_causal_lm(teacher_cfg, teacher_tokenizer, dtype=dtype, key="teacher",
                                  device=device() if replicated else None)
        teacher.requires_grad_(False)
        teacher.eval()
        teacher_head_module = head_of(teacher)
    if engine_cfg.zero_stage == 3:
        keepalive.append(HfDeepSpeedConfig(s_config))  # the student's stays alive (generate's synced_gpus)
    student = build_causal_lm(student_cfg, student_tokenizer, dtype=dtype, key="student")
    if student_cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if student_cfg.lora.enabled:
        student = apply_lora(student, student_cfg.lora)

    t2s = s2t_learned = s2t_map = None
    teacher_to_student = None
    if needs_projectors:
        if vocab_map is None:
            raise ValueError(f"kd.criterion={kd.criterion} needs the shards' vocab_map.safetensors")
        teacher_hidden = teacher_head_module.in_features
        t2s = T2SProjector(teacher_hidden, hidden_size_of(student))
        if kd.s2t_map == "learned":
            s2t_learned = LearnedS2TMap(hidden_size_of(student), teacher_hidden)
        overlap = _overlap_ids(vocab_map, head_of(student).out_features, teacher_head_module.out_features)
        s2t_map = _init_projectors(kd, student, teacher_head_module, t2s, s2t_learned, overlap)
    if teacher_head_module is not None and vocab_map is not None:
        teacher_to_student = torch.as_tensor(vocab_map["teacher_to_student"], dtype=torch.long)

    cma = None
    if kd.criterion == "dskd_cma":
        from dskd_scale.losses.baselines import build_cma_projectors

        cma = build_cma_projectors(hidden_size_of(student), hidden_size_of(teacher),
                                   causal_lm_of(student).get_input_embeddings().embedding_dim,
                                   causal_lm_of(teacher).get_input_embeddings().embedding_dim)
        for layer in cma.values():  # identical initial weights on every rank
            for param in layer.parameters():
                _broadcast_from_rank0(param.data)
    module = DistillStudent(student, t2s, s2t_learned, cma)
    fp32_values = cast_for_engine(module, dtype)  # projectors (fp32 init) and upcast adapters -> engine dtype
    groups = param_groups(module, optim)
    lambdas = [lr_lambda(optim, total_steps, group["lr"]) for group in groups]
    student_engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=groups, config=s_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas))
    start_master_weights_from(student_engine, fp32_values)
    engines = Engines(student=student_engine, teacher=None, student_tokenizer=student_tokenizer,
                      teacher_tokenizer=teacher_tokenizer, student_ds_config=s_config, teacher_ds_config=t_config,
                      keepalive=keepalive)
    if teacher is not None and replicated:
        engines.teacher = ReplicatedTeacher(TeacherBody(teacher))
        engines.teacher_head = linear_head(engines.teacher.module.head.weight)  # the full weight, no second copy
    elif teacher is not None:
        teacher_engine, *_ = deepspeed.initialize(model=TeacherBody(teacher), config=t_config)
        teacher_engine.eval()
        engines.teacher = teacher_engine
        teacher_head_module = teacher_engine.module.head
        engines.teacher_head = linear_head(full_copy(teacher_head_module.weight))
    elif cached:  # no teacher engine: the frozen head alone (teacher-space logits, s2t map)
        engines.teacher_head = linear_head(teacher_head_module.weight.to(device()))
    if s2t_map is not None:
        s2t_map.to(device())
    engines.s2t_map = s2t_map if s2t_map is not None else student_engine.module.s2t_projector
    engines.teacher_to_student_ids = None if teacher_to_student is None else teacher_to_student.to(device())
    engines.student_head = StudentHead(
        student_engine.module.head, s2t_map,
        input_embedding=causal_lm_of(student).get_input_embeddings() if kd.criterion == "dskd_cma" else None)
    if teacher_head_module is not None and kd.criterion not in ("dskd", "dskd_eta"):
        engines.baseline_resources = _baseline_resources(kd, student_tokenizer, teacher_tokenizer, engines.teacher)
    if student_engine.zero_optimization_partition_gradients():
        if student_engine.module.head.weight.requires_grad:
            defer_head_gradient(student_engine.module.head.weight)
    else:
        student_engine.enable_backward_allreduce = False  # Engines.backward all-reduces after routing
    log.info("engines built: student %s, teacher %s (%s), ZeRO-%d, %s", type(student).__name__,
             type(teacher).__name__ if teacher is not None else "head only" if cached else "none",
             teacher_cfg.placement if teacher is not None else "cache" if cached else "-", engine_cfg.zero_stage,
             engine_cfg.precision)
    return engines
