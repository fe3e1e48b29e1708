"""Wire one run from its config: process group, verified data, tokenizers, engines, output folder.

Kept apart from the loop so the loop reads as the training step only, and so benchmarks and tests can
build a run the same way ``launch/train.py`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dskd_scale.config.loader import save_config
from dskd_scale.config.run import DSKD_V2_CRITERIA, ModelConfig, RunConfig
from dskd_scale.data import format as shard_format
from dskd_scale.data.dataset import DataError, PrealignedDataset
from dskd_scale.data.loader import CachedTeacherRows, TrainLoader, build_train_loader
from dskd_scale.engine.build import Engines, build_engines
from dskd_scale.engine.distributed import init_distributed
from dskd_scale.models.build import load_tokenizer
from dskd_scale.onpolicy import RolloutPlan, plan_rollouts
from dskd_scale.utils.logging import get_logger, is_rank_zero

log = get_logger(__name__)


@dataclass
class Setup:
    cfg: RunConfig
    engines: Engines
    train_loader: TrainLoader
    eval_loader: TrainLoader | None
    total_steps: int
    output_dir: Path
    rank: int
    world_size: int
    rollout_plan: RolloutPlan | None = None  # on-policy runs only (kd.on_policy.ratio > 0)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


def open_dataset(path: str, key: str, student_tokenizer, teacher_tokenizer) -> PrealignedDataset:
    """Open shards, refusing a tokenizer fingerprint mismatch (the error names ``key`` and the folder)."""
    try:
        return PrealignedDataset.open(
            path,
            expected_student_fingerprint=shard_format.tokenizer_fingerprint(student_tokenizer),
            expected_teacher_fingerprint=(None if teacher_tokenizer is None
                                          else shard_format.tokenizer_fingerprint(teacher_tokenizer)))
    except DataError as err:
        raise DataError(f"{key}={path}: {err}") from err


def total_optimizer_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    per_epoch = micro_batches_per_epoch // cfg.optim.grad_accum
    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    if per_epoch == 0:
        raise DataError(f"data.train_dir: one epoch has {micro_batches_per_epoch} micro-batches per rank, fewer than "
                        f"optim.grad_accum={cfg.optim.grad_accum}; use more data or set optim.max_steps")
    return cfg.optim.epochs * per_epoch


def tokenizer_key(cfg: ModelConfig, role: str) -> str:
    """The config key a model's tokenizer comes from: ``<role>.tokenizer`` if set, else ``<role>.path``."""
    return f"{role}.tokenizer" if cfg.tokenizer else f"{role}.path"


def uses_teacher_tokenizer(cfg: RunConfig) -> bool:
    return cfg.needs_teacher or bool(cfg.teacher.tokenizer_path)


def open_run_data(cfg: RunConfig, student_tokenizer, teacher_tokenizer
                  ) -> tuple[PrealignedDataset, PrealignedDataset | None]:
    """The verified training set and the evaluation set (``data.eval_dir``, a hold-out, or none)."""
    train_set = open_dataset(cfg.data.train_dir, "data.train_dir", student_tokenizer, teacher_tokenizer)
    eval_set = None
    if cfg.data.eval_dir:
        eval_set = open_dataset(cfg.data.eval_dir, "data.eval_dir", student_tokenizer, teacher_tokenizer)
    elif cfg.data.eval_holdout > 0:
        holdout = int(cfg.data.eval_holdout) if cfg.data.eval_holdout >= 1 else cfg.data.eval_holdout
        train_set, eval_set = train_set.split_holdout(holdout, seed=cfg.data.seed)
    return train_set, eval_set


def open_teacher_cache(cfg: RunConfig) -> CachedTeacherRows | None:
    """``teacher.cache_dir`` opened against the configured teacher and training data, or None when unset.

    Raises:
        DataError: naming ``teacher.cache_dir``: a missing or half-written cache, or fingerprints (teacher config
            and weights, prealigned manifest) or hidden size that differ from this run's.
    """
    if not cfg.teacher.cache_dir:
        return None
    from transformers import AutoConfig

    from dskd_scale.teacher_cache import TeacherCache, data_fingerprint, teacher_fingerprint, text_fingerprint

    key = f"teacher.cache_dir={cfg.teacher.cache_dir}"
    try:
        config = AutoConfig.from_pretrained(cfg.teacher.path)
        hidden_size = int(getattr(config, "hidden_size", None) or config.n_embd)
        cache = TeacherCache.open(cfg.teacher.cache_dir, teacher_fingerprint=teacher_fingerprint(cfg.teacher.path),
                                  data_fingerprint=data_fingerprint(cfg.data.train_dir), hidden_size=hidden_size,
                                  text_fingerprint=text_fingerprint(cfg.data.train_dir))
    except (ValueError, OSError) as err:  # CacheMismatch (a ValueError) names the field at fault
        message = str(err)
        raise DataError(message if "teacher.cache_dir" in message else f"{key}: {message}") from err
    return CachedTeacherRows(cache)


def run_train_loader(cfg: RunConfig, train_set: PrealignedDataset, *, rank: int, world_size: int,
                     teacher_rows: CachedTeacherRows | None = None) -> TrainLoader:
    return build_train_loader(train_set, rank=rank, world_size=world_size,
                              micro_batch_size=cfg.data.micro_batch_size,
                              seed=cfg.data.seed, group_by_length=cfg.data.group_by_length,
                              num_workers=cfg.data.num_workers, teacher_rows=teacher_rows)


def setup_run(cfg: RunConfig) -> Setup:
    """Everything ``loop.train`` needs; collective (call on every rank)."""
    rank, world = init_distributed(cfg.engine.dist_backend, skip_cpu_shm_op=cfg.engine.skip_cpu_shm_op)
    output_dir = Path(cfg.output_dir)
    student_tokenizer = load_tokenizer(cfg.student.tokenizer_path, key=tokenizer_key(cfg.student, "student"))
    teacher_tokenizer = None
    if uses_teacher_tokenizer(cfg):
        teacher_tokenizer = load_tokenizer(cfg.teacher.tokenizer_path, key=tokenizer_key(cfg.teacher, "teacher"))
    train_set, eval_set = open_run_data(cfg, student_tokenizer, teacher_tokenizer)
    teacher_rows = open_teacher_cache(cfg)  # refused here, before any engine is built
    train_loader = run_train_loader(cfg, train_set, rank=rank, world_size=world, teacher_rows=teacher_rows)
    eval_loader = None
    if eval_set is not None:
        eval_loader = build_train_loader(eval_set, rank=rank, world_size=world,
                                         micro_batch_size=cfg.data.eval_micro_batch_size or cfg.data.micro_batch_size,
                                         seed=cfg.data.seed, group_by_length=False, shuffle=False, drop_last=False,
                                         teacher_rows=teacher_rows)  # a holdout of train_dir: cached too
    total_steps = total_optimizer_steps(cfg, len(train_loader))
    engines = build_engines(
        student_cfg=cfg.student, teacher_cfg=cfg.teacher if cfg.needs_teacher else None, kd=cfg.kd,
        optim=cfg.optim, engine_cfg=cfg.engine, micro_batch_size=cfg.data.micro_batch_size,
        total_steps=total_steps, vocab_map=train_set.vocab_map,
        needs_projectors=cfg.kd.criterion in DSKD_V2_CRITERIA,
        student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
    rollout_plan = None
    if cfg.kd.on_policy.enabled:
        try:
            rollout_plan = plan_rollouts(cfg.kd.on_policy, train_set.manifest, engines.student_module.causal_lm,
                                         engines.teacher.module.teacher)
        except ValueError as err:
            raise DataError(str(err)) from err
    if is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "run_config.yaml")
        (output_dir / "ds_config.json").write_text(json.dumps(engines.student_ds_config, indent=2))
        if engines.teacher_ds_config is not None:
            (output_dir / "ds_config_teacher.json").write_text(json.dumps(engines.teacher_ds_config, indent=2))
    log.info("run %s: %d train examples, %d optimizer steps, world %d", cfg.name, len(train_set), total_steps, world)
    return Setup(cfg=cfg, engines=engines, train_loader=train_loader, eval_loader=eval_loader,
                 total_steps=total_steps, output_dir=output_dir, rank=rank, world_size=world,
                 rollout_plan=rollout_plan)
