"""The training loop, written out: fetch GA window -> one collective (global counts, stop flag, agreement)
-> per micro-batch: teacher forward (no_grad) -> student forward -> criterion -> combine -> backward -> step
-> log / eval / checkpoint.

Collectives per optimizer step: the one all-reduce above, the student head gather (DSKD only) and
DeepSpeed's own. Metrics are reduced once per logging interval (``metrics.MetricWindow``).

Non-finite values: a micro-batch whose loss is not finite, or whose teacher hidden states are not finite at
a real token (masked terms could keep such a loss finite), gets a NaN loss, hence NaN gradients, which
DeepSpeed's ZeRO optimizer detects through its all-reduced global gradient norm and skips on every rank (no
optimizer or scheduler update). The loop counts those micro-batches (summed over ranks with the metrics), logs
no loss for a skipped step (the window mean is over applied steps) and stops with ``TrainingDiverged`` after
``optim.max_consecutive_skipped_steps`` skipped steps in a row, before anything is exported.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dskd_scale.config.loader import config_to_dict
from dskd_scale.criteria import batch_rows, combine, compute_terms, head_grad_weights, local_counts
from dskd_scale.data.format import atomic_write_bytes
from dskd_scale.engine import checkpoint as ckpt
from dskd_scale.engine.distributed import all_reduce_sum, device
from dskd_scale.engine.export import export_student
from dskd_scale.engine.rollout import SamplingSettings, generate_rollouts, generate_rollouts_per_token_gather
from dskd_scale.engine.signals import EXIT_REQUEUE, StopSignal
from dskd_scale.losses import use_t2s_agreement_mask
from dskd_scale.metrics import MetricWindow, memory_bytes
from dskd_scale.onpolicy import RolloutStats, is_on_policy_step, rollout_generator_seed, rollout_micro_batches
from dskd_scale.onpolicy.batch import rates as rollout_rates
from dskd_scale.tb_logging import log_run_start
from dskd_scale.train_setup import Setup
from dskd_scale.utils.logging import get_logger, is_rank_zero

log = get_logger(__name__)


@dataclass
class LoopState:
    """Counters saved with every checkpoint (identical on all ranks)."""

    step: int = 0
    student_tokens: int = 0
    skipped_steps: int = 0
    consecutive_skipped_steps: int = 0
    nonfinite_losses: int = 0  # micro-batches, all ranks: non-finite loss or teacher hidden states
    nonfinite_teacher: int = 0  # of which the teacher's hidden states were not finite
    agreement_hits: float = 0.0  # previous step's global t2s agreement hits / aligned rows
    agreement_rows: float = 0.0


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite values (raised on every rank)."""


# MetricWindow totals that update LoopState counters when reduced (summed over ranks).
_COUNTERS = {"count/nonfinite_losses": "nonfinite_losses", "count/nonfinite_teacher": "nonfinite_teacher",
             "count/student_tokens": "student_tokens"}


def _add_counters(state: LoopState, totals: dict[str, float]) -> None:
    for name, field_name in _COUNTERS.items():
        setattr(state, field_name, getattr(state, field_name) + int(round(totals.pop(name, 0.0))))


def _teacher_nonfinite(hidden: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """True (0-dim, on device) if the teacher's hidden state is not finite at some real (unmasked) token.

    With a teacher cache the rows the losses read are ``batch["teacher_hidden_rows"]`` (all real tokens)."""
    if hidden is None and "teacher_hidden_rows" in batch:
        return (~torch.isfinite(batch["teacher_hidden_rows"])).any()
    if hidden is None:
        return torch.zeros((), dtype=torch.bool, device=batch["student_attention_mask"].device)
    return ((~torch.isfinite(hidden)).any(dim=-1) & batch["teacher_attention_mask"].bool()).any()


def seeded_rng_state(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return ckpt.rng_state()


def _endless(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def _to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    target = device()
    return {k: v.to(target, non_blocking=True) for k, v in batch.items()}


def _teacher_hidden(setup: Setup, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The live teacher's last hidden states; None for ``sft`` and for a batch that carries cached teacher rows
    (``teacher.cache_dir``: no teacher engine exists; the criteria read ``batch["teacher_hidden_rows"]``)."""
    if setup.engines.teacher is None or "teacher_hidden_rows" in batch:
        return None
    with torch.no_grad():
        return setup.engines.teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])


def _rollouts(setup: Setup, micro: list[dict[str, torch.Tensor]], step: int
              ) -> tuple[list[dict[str, torch.Tensor]], RolloutStats]:
    """This step's micro-batches with the gold responses replaced by student rollouts (collective: generation
    gathers the student's parameters once for the whole step, on every rank)."""
    engines, cfg = setup.engines, setup.cfg
    options = cfg.kd.on_policy
    settings = SamplingSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                top_p=options.top_p, top_k=options.top_k)
    collator = setup.train_loader.collator
    # Seeded from (seed, rank, step): a resumed run samples what the uninterrupted one sampled at this step. A CPU
    # generator: the same draws whatever the accelerator.
    generator = torch.Generator().manual_seed(rollout_generator_seed(cfg.seed, setup.rank, step))
    common = {"generator": generator, "eos_id": int(engines.student_tokenizer.eos_token_id),
               "pad_id": collator.student_pad_id}

    def generate(prompts: list[np.ndarray]) -> list[np.ndarray]:
        if options.gather == "per_token":
            return generate_rollouts_per_token_gather(engines, prompts, settings, **common)
        return generate_rollouts(engines, prompts, settings, **common,
                                 max_gather_bytes=int(options.max_gather_gb * 2**30) or None)

    return rollout_micro_batches(micro, generate, student_tokenizer=engines.student_tokenizer,
                                 teacher_tokenizer=engines.teacher_tokenizer, collator=collator,
                                 whitespace=setup.rollout_plan.whitespace,
                                 teacher_max_length=setup.rollout_plan.teacher_max_positions)


def _save(setup: Setup, state: LoopState, sampler_state: dict, window: MetricWindow) -> None:
    """Collective. Flushes the window's counters into ``state`` first: the checkpoint holds exact global counts."""
    import yaml

    _add_counters(state, window.reduce_totals(all_reduce_sum, device()))
    tag_dir = setup.checkpoint_dir / ckpt.step_tag(state.step)
    if ckpt.verify(tag_dir) is None:
        # Already checkpointed (a periodic save, then a signal at the same boundary; or a rerun after a kill
        # between COMPLETE and `latest`): make sure `latest` moves forward to it.
        if is_rank_zero():
            ckpt.mark_latest(setup.checkpoint_dir, tag_dir.name)
        return
    extra = {"run_config.yaml": yaml.safe_dump(config_to_dict(setup.cfg), sort_keys=False),
             "ds_config.json": json.dumps(setup.engines.student_ds_config, indent=2)}
    ckpt.save_checkpoint(setup.engines.student, setup.checkpoint_dir, state.step,
                         client_state={"loop": asdict(state), "sampler": sampler_state},
                         extra_files=extra, keep_last=setup.cfg.checkpoint.keep_last)


def _resume(setup: Setup, state: LoopState) -> None:
    policy = setup.cfg.checkpoint.resume
    if policy == "never":
        return
    save_dir = setup.checkpoint_dir if policy == "auto" else Path(policy)
    tag = ckpt.latest_complete_tag(save_dir)
    if tag is None:
        if policy != "auto":
            raise FileNotFoundError(f"checkpoint.resume={policy}: no complete checkpoint there")
        return
    client = ckpt.load_checkpoint(setup.engines.student, save_dir, tag)
    for key, value in client["loop"].items():
        setattr(state, key, value)
    setup.train_loader.load_state_dict(client["sampler"])
    if policy == "auto" and is_rank_zero():
        ckpt.mark_latest(save_dir, tag)  # a kill between COMPLETE and `latest` left it one checkpoint behind
    log.info("resumed from %s at step %d", save_dir / tag, state.step)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rank 0, at start: drop ``metrics.jsonl`` rows of steps after ``step`` (a resume re-runs them), and a last
    line cut short by a kill; atomic."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if line.strip() and keep(line)]
    if kept != lines:
        atomic_write_bytes(path, "".join(kept).encode())
        log.info("%s: dropped %d row(s) after step %d (they are re-run)", path, len(lines) - len(kept), step)


def evaluate(setup: Setup, max_batches: int) -> dict[str, float]:
    """Held-out loss terms over the eval split (same batches every time); one all-reduce at the end."""
    engines, kd = setup.engines, setup.cfg.kd
    loader = setup.eval_loader
    loader.sampler.set_epoch(0)
    engines.student.eval()
    engines.student_head.refresh()
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        batch = _to_device(batch)
        rows = batch_rows(batch)
        with torch.no_grad():
            teacher_hidden = _teacher_hidden(setup, batch)
            student_hidden = engines.student(batch["student_input_ids"], batch["student_attention_mask"])
        with torch.enable_grad():  # frozen-head terms take an input gradient eagerly; nothing is applied
            terms = compute_terms(kd, rows, student_hidden, teacher_hidden, engines, batch=batch)
        for name, (value_sum, count) in terms.items():
            for suffix, value in (("sum", value_sum), ("count", count)):
                sums[f"{name}/{suffix}"] = sums.get(f"{name}/{suffix}", 0) + value.detach().double()
    engines.student.train()
    engines.student_head.drop_leaves()
    names = sorted(sums)
    packed = all_reduce_sum(torch.stack([sums[n].to(device()) for n in names])).cpu() if names else []
    reduced = dict(zip(names, packed, strict=True))
    terms_total = {n[:-4]: (reduced[n], reduced[n[:-4] + "/count"]) for n in names if n.endswith("/sum")}
    counts = {name: count for name, (_, count) in terms_total.items()}
    _, metrics = combine(kd, terms_total, counts, world_size=1, grad_accum_steps=1)
    return {f"eval/{name}": float(value) for name, value in metrics.items()}


def _log(setup: Setup, window: MetricWindow, state: LoopState, writer, bar) -> None:
    values = window.reduce(all_reduce_sum, setup.world_size, device())
    _add_counters(state, values)
    values["train/skipped_steps"] = state.skipped_steps
    values["train/nonfinite_losses"] = state.nonfinite_losses
    values["train/nonfinite_teacher"] = state.nonfinite_teacher
    values["train/student_tokens"] = state.student_tokens
    if is_rank_zero():
        with open(setup.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"step": state.step, **values}) + "\n")
        for name, value in values.items():
            if writer is not None:
                writer.add_scalar(name, value, state.step)
        if bar is not None:
            bar.set_postfix(loss=f"{values.get('train/loss', float('nan')):.4f}",
                            tok_s=f"{values.get('perf/tokens_per_s', 0.0):.0f}")
        log.info("step %d %s", state.step, " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))


def _report_teacher(setup: Setup) -> None:
    """Log (and write to teacher_state.json) that the teacher stayed frozen and partitioned on this rank."""
    teacher = setup.engines.teacher
    if teacher is None:
        return
    params = list(teacher.module.parameters())
    report = {"rank": setup.rank,
              "params_with_grad": sum(p.grad is not None for p in params),
              "params_requiring_grad": sum(p.requires_grad for p in params),
              # materialised now on this rank (ZeRO-3 keeps params under stage3_param_persistence_threshold whole)
              "local_elements": sum(p.numel() for p in params),
              "full_elements": sum(int(getattr(p, "ds_numel", p.numel())) for p in params)}
    largest = max(params, key=lambda p: int(getattr(p, "ds_numel", p.numel())))
    report["largest_param_local_elements"] = largest.numel()
    report["largest_param_partition_elements"] = int(getattr(largest, "ds_tensor", largest).numel())
    report["largest_param_full_elements"] = int(getattr(largest, "ds_numel", largest.numel()))
    log.info("teacher state: %s", report)
    with open(setup.output_dir / f"teacher_state_rank{setup.rank}.json", "w") as handle:
        json.dump(report, handle)


def train(setup: Setup) -> int:
    """Run to ``setup.total_steps``; returns the process exit status (0, or 75 after a stop signal)."""
    cfg, engines = setup.cfg, setup.engines
    kd, ga = cfg.kd, cfg.optim.grad_accum
    stop = StopSignal().install()
    state = LoopState()
    # Dropout and any sampling draw from these; a resume replaces them with the checkpoint's states.
    ckpt.set_rng_state(seeded_rng_state(cfg.seed + setup.rank))
    _resume(setup, state)
    if is_rank_zero():
        _drop_metrics_after(setup.output_dir / "metrics.jsonl", state.step)
    writer = bar = None
    if is_rank_zero():
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the resumed one are dropped (they are re-run).
            writer = SummaryWriter(str(setup.output_dir / "tensorboard"), purge_step=state.step + 1)
            log_run_start(writer, config_to_dict(cfg), world_size=setup.world_size, train_dir=cfg.data.train_dir)
        if cfg.log.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=setup.total_steps, initial=state.step, desc=cfg.name, unit="step", dynamic_ncols=True)
    window = MetricWindow()
    batches = _endless(setup.train_loader)
    engines.student.train()
    try:
        while state.step < setup.total_steps:
            step_start = time.perf_counter()
            sampler_before = setup.train_loader.state_dict()
            micro = [next(batches) for _ in range(ga)]
            # The same decision on every rank, from (seed, step) alone (onpolicy/schedule.py): no collective.
            on_policy = is_on_policy_step(cfg.seed, state.step, kd.on_policy.ratio)
            rollout_seconds, rollout_stats = 0.0, RolloutStats()
            if on_policy:
                rollout_start = time.perf_counter()
                micro, rollout_stats = _rollouts(setup, micro, state.step)
                rollout_seconds = time.perf_counter() - rollout_start
            micro = [_to_device(batch) for batch in micro]
            rows = [batch_rows(batch) for batch in micro]
            counts: dict[str, float] = {}
            for row, batch in zip(rows, micro, strict=True):
                for name, value in local_counts(kd, row, batch).items():
                    counts[name] = counts.get(name, 0) + float(value)
            names = sorted(counts)
            # One collective per step: global denominators, the stop decision, last step's agreement and this
            # step's rollout counts.
            packed = torch.tensor([counts[n] for n in names] + [1.0 if stop.received else 0.0,
                                                                 state.agreement_hits, state.agreement_rows]
                                  + rollout_stats.values(), dtype=torch.float64, device=device())
            packed = all_reduce_sum(packed).cpu().tolist()
            rollout_totals = dict(zip(RolloutStats.names(), packed[len(names) + 3:], strict=True))
            if packed[len(names)] > 0:
                log.warning("stop signal: checkpointing at step %d and exiting with %d", state.step, EXIT_REQUEUE)
                _save(setup, state, sampler_before, window)
                return EXIT_REQUEUE
            global_counts = dict(zip(names, packed[: len(names)], strict=True))
            agreement_mask = use_t2s_agreement_mask(packed[len(names) + 1], packed[len(names) + 2],
                                                    kd.t2s_agreement_threshold)
            weights = head_grad_weights(kd, global_counts, world_size=setup.world_size, grad_accum_steps=ga)
            engines.student_head.refresh()
            teacher_seconds, agreement_hits, step_tokens = 0.0, 0.0, 0
            step_metrics: dict[str, torch.Tensor] = {}
            step_nonfinite, step_teacher_nonfinite = 0, 0
            for batch, row in zip(micro, rows, strict=True):
                teacher_start = time.perf_counter()
                teacher_hidden = _teacher_hidden(setup, batch)
                teacher_seconds += time.perf_counter() - teacher_start
                student_hidden = engines.student(batch["student_input_ids"], batch["student_attention_mask"])
                terms = compute_terms(kd, row, student_hidden, teacher_hidden, engines,
                                      agreement_mask=agreement_mask, batch=batch, head_grad_weights=weights)
                loss, metrics = combine(kd, terms, global_counts, world_size=setup.world_size, grad_accum_steps=ga,
                                        agreement_mask=agreement_mask)
                flags = torch.stack([~torch.isfinite(loss), _teacher_nonfinite(teacher_hidden, batch)])
                nonfinite_loss, bad_teacher = flags.tolist()  # one host sync, as the finiteness check alone
                if bad_teacher:
                    loss = loss * float("nan")  # NaN gradients: DeepSpeed skips the step on every rank
                step_nonfinite += int(nonfinite_loss or bad_teacher)
                step_teacher_nonfinite += int(bad_teacher)
                engines.backward(loss)
                engines.student.step()
                for name, value in metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0.0) + value.detach()
                if "t2s_agreement" in terms:
                    agreement_hits += float(terms["t2s_agreement"][0])
                step_tokens += int(batch["student_attention_mask"].sum())
            if engines.student.was_step_applied():  # the same decision on every rank
                state.consecutive_skipped_steps = 0
                for name, value in step_metrics.items():  # a skipped step's loss is not logged
                    if not (on_policy and name == "ce"):  # nor the CE of an on-policy step (it has no row)
                        window.add_global(f"train/{name}", value)
            else:
                state.skipped_steps += 1
                state.consecutive_skipped_steps += 1
                log.warning("step %d skipped: non-finite gradient norm (collective decision)", state.step + 1)
            window.add_total("count/nonfinite_losses", step_nonfinite)
            window.add_total("count/nonfinite_teacher", step_teacher_nonfinite)
            window.add_total("count/student_tokens", step_tokens)
            state.step += 1
            state.agreement_hits, state.agreement_rows = agreement_hits, global_counts.get("kd_t2s", 0.0) / max(
                setup.world_size, 1)
            step_seconds = time.perf_counter() - step_start
            window.add_global("perf/tokens_per_s", step_tokens / step_seconds)
            if kd.on_policy.enabled:
                window.add_global("onpolicy/step_fraction", float(on_policy) / setup.world_size)
                window.add_local("onpolicy/rollout_time_share", rollout_seconds / step_seconds)
            if on_policy:  # averaged over the interval's on-policy steps (global values, shared out over ranks)
                for name, value in rollout_rates(rollout_totals).items():
                    window.add_global(name, value / setup.world_size)
            elif "kd_t2s" in global_counts:  # aligned rows per gold response token (DSKD criteria only)
                window.add_global("train/alignment_ratio", global_counts["kd_t2s"]
                                  / max(global_counts.get("ce", 0.0), 1.0) / setup.world_size)
            window.add_local("perf/step_seconds", step_seconds)
            window.add_local("perf/teacher_time_share", teacher_seconds / step_seconds)
            for name, value in memory_bytes().items():
                window.add_peak(name, value)  # the largest rank decides whether a run fits
            window.end_step()
            grad_norm = engines.student.get_global_grad_norm()
            if grad_norm is not None:
                window.set_last("train/grad_norm", float(grad_norm))
            for group in engines.student.optimizer.param_groups:
                window.set_last(f"lr/{group.get('name', 'group')}", group["lr"])
            if bar is not None:
                bar.update(1)
            last = state.step == setup.total_steps
            if state.step % cfg.log.every_steps == 0 or last:
                _log(setup, window, state, writer, bar)
            if setup.eval_loader is not None and (
                    (cfg.log.eval_every_steps and state.step % cfg.log.eval_every_steps == 0) or last):
                values = evaluate(setup, cfg.log.eval_max_batches)
                if is_rank_zero():
                    log.info("eval at step %d: %s", state.step, values)
                    with open(setup.output_dir / "metrics.jsonl", "a") as handle:
                        handle.write(json.dumps({"step": state.step, **values}) + "\n")
                    if writer is not None:
                        for name, value in values.items():
                            writer.add_scalar(name, value, state.step)
            limit = cfg.optim.max_consecutive_skipped_steps
            if limit and state.consecutive_skipped_steps >= limit:
                raise TrainingDiverged(
                    f"training diverged: the last {state.consecutive_skipped_steps} optimizer steps (to step "
                    f"{state.step}) were all skipped for non-finite gradients (optim.max_consecutive_skipped_steps="
                    f"{limit}); nothing exported. Lower optim.lr (now {cfg.optim.lr:g}) or check the data; "
                    f"checkpoints in {setup.checkpoint_dir} saved during those steps hold the diverged weights")
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or last:
                _save(setup, state, setup.train_loader.state_dict(), window)
        if cfg.checkpoint.export_at_end:
            export_student(engines, setup.output_dir / "export")
        _report_teacher(setup)
        return 0
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
