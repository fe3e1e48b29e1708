"""Student rollouts for on-policy distillation: sampling from the (ZeRO-3) student with a KV cache.

Why a plain replica and not ``GatheredParameters`` around the live model: the live student still carries ZeRO-3's
module hooks, and every module call runs them. The post-forward hook releases (re-partitions) the module's
parameters whenever no other submodule holds them (``PartitionedParameterCoordinator.release_sub_module``), also
those gathered by an outer ``GatheredParameters``; the next token's pre-forward hook gathers them again. So a
gather around ``generate`` still costs one all-gather per layer per token, and since those are collectives every
rank would have to run the same number of forwards. ``generate_rollouts`` instead builds a hook-free copy of the
HF causal LM (constructed on the meta device from the same config, so nothing is initialised twice), fills it
bucket by bucket inside ``GatheredParameters`` (each partitioned parameter is all-gathered exactly once per
call, the same collectives in the same order on every rank), generates with no collective at all (ranks may stop
at different tokens), and frees it. LoRA adapters (peft) are merged into the copy's weights with peft's own
``get_delta_weight``. Without ZeRO-3 (stages 0-2) the parameters are already whole: the live model generates
directly, in eval mode, and its train/eval flags are restored.

Memory: the copy holds the whole student in the run's precision on each rank, plus the KV cache. A student too
large for that is refused before any collective, with the same decision on every rank (``RolloutMemoryError``,
naming ``kd.on_policy``); the fallback is ``generate_rollouts_per_token_gather``, which generates through the
ZeRO-3 hooks (one layer gathered at a time, per token: bounded memory, much slower).

Decoding: prompts are left-padded into one batch (attention mask, position ids counted from each row's first real
token, as Hugging Face ``generate`` does), logits are computed for the last position only, and each new token is
drawn by inverse-CDF sampling from the filtered distribution with one uniform per row taken from the caller's
``torch.Generator`` (every row consumes one uniform per decoding step, finished or not), so the same generator
state gives the same samples. Greedy (temperature 0) draws nothing. Shape legend: ``B`` rows, ``P`` padded prompt
length, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dskd_scale.engine.distributed import any_rank, device, rank
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)

GATHER_BUCKET_BYTES = 1 << 28  # parameters gathered per collective while filling the replica


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingSettings:
    """How rollout tokens are drawn (``kd.on_policy``): temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if problems:
            raise ValueError("kd.on_policy: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RolloutMemoryError(RuntimeError):
    """The whole student (plus KV cache) does not fit on one device for gather-once generation."""


# ---- sampling (pure tensor functions) ----------------------------------------

def filtered_probs(logits_BV: Tensor, settings: SamplingSettings) -> Tensor:
    """fp32 next-token probabilities ``[B, V]`` after temperature, then top-k, then top-p (Hugging Face's order).

    top-k keeps the ``k`` largest logits (ties at the k-th value are kept too); top-p keeps the smallest set of
    most likely tokens whose probability reaches ``top_p`` (a token is kept while the mass before it is below
    ``top_p``; the most likely token always stays). Removed tokens get probability 0; the rest is renormalised.
    """
    if settings.greedy:
        raise ValueError("filtered_probs: temperature 0 is greedy decoding (argmax), there is no distribution")
    scaled_BV = logits_BV.float() / settings.temperature
    if 0 < settings.top_k < scaled_BV.shape[-1]:
        kth_B1 = torch.topk(scaled_BV, settings.top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(scaled_BV, dim=-1)
    if settings.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(probs_BV, dim=-1, descending=True)
        mass_before_BV = torch.cumsum(sorted_BV, dim=-1) - sorted_BV
        drop_sorted_BV = mass_before_BV >= settings.top_p
        drop_sorted_BV[:, 0] = False
        probs_BV = probs_BV.masked_fill(torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV), 0.0)
        probs_BV = probs_BV / probs_BV.sum(dim=-1, keepdim=True)
    return probs_BV


def sample_from(probs_BV: Tensor, uniform_B: Tensor) -> Tensor:
    """Inverse-CDF sample ``[B]`` int64: the first token whose cumulative probability exceeds ``u * total``.

    Tokens of probability 0 are never chosen (their cumulative value equals the previous token's).
    """
    cumulative_BV = torch.cumsum(probs_BV.double(), dim=-1)
    target_B1 = (uniform_B.to(cumulative_BV) * cumulative_BV[:, -1]).unsqueeze(1)
    index_B = torch.searchsorted(cumulative_BV, target_B1, right=True).squeeze(1)
    return index_B.clamp_(max=probs_BV.shape[-1] - 1)


def next_tokens(logits_BV: Tensor, settings: SamplingSettings, generator: torch.Generator) -> Tensor:
    """One token per row ``[B]``: argmax when greedy, else a sample (one uniform per row from ``generator``)."""
    if settings.greedy:
        return logits_BV.argmax(dim=-1)
    uniform_B = torch.rand(logits_BV.shape[0], generator=generator, device=generator.device, dtype=torch.float64)
    return sample_from(filtered_probs(logits_BV, settings), uniform_B.to(logits_BV.device))


# ---- the decoding loop ----------------------------------------

def _left_padded(prompt_ids: Sequence[np.ndarray], pad_id: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    lengths = [int(np.asarray(p).size) for p in prompt_ids]
    if min(lengths) < 1:
        raise ValueError(f"generate_rollouts: prompt {lengths.index(min(lengths))} is empty (a rollout needs at "
                         "least one prompt token, e.g. BOS)")
    width = max(lengths)
    ids_BP = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids_BP[row, width - lengths[row]:] = torch.as_tensor(np.asarray(prompt, dtype=np.int64))
        mask_BP[row, width - lengths[row]:] = 1
    return ids_BP.to(dev), mask_BP.to(dev)


def _check_positions(model: nn.Module, prompt_ids: Sequence[np.ndarray], settings: SamplingSettings) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    longest = max(int(np.asarray(p).size) for p in prompt_ids)
    if limit is not None and longest + settings.max_new_tokens > limit:
        raise ValueError(f"kd.on_policy.max_new_tokens: a prompt of {longest} tokens plus {settings.max_new_tokens} "
                         f"new tokens exceeds the student's {limit} positions")


@torch.no_grad()
def _decode(model: nn.Module, prompt_ids: Sequence[np.ndarray], settings: SamplingSettings, *,
            generator: torch.Generator, eos_id: int, pad_id: int, lockstep: bool,
            before_forward: Callable[[], None] = lambda: None) -> list[np.ndarray]:
    """Batched KV-cache decoding of ``model`` (a HF causal LM in eval mode).

    ``lockstep``: every rank runs the same number of forwards (the model's forward holds collectives): the loop
    stops only when all rows of all ranks finished (one all-reduce per token) or at ``max_new_tokens``.
    ``before_forward`` runs before every forward.
    """
    dev = device()
    ids_BP, mask_BP = _left_padded(prompt_ids, pad_id, dev)
    positions_BP = (mask_BP.cumsum(-1) - 1).masked_fill_(mask_BP == 0, 1)
    before_forward()
    out = model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=positions_BP, use_cache=True,
                logits_to_keep=1)
    next_position_B1 = positions_BP[:, -1:] + 1
    done_B = torch.zeros(ids_BP.shape[0], dtype=torch.bool, device=dev)
    tokens = []
    for step in range(settings.max_new_tokens):
        token_B = next_tokens(out.logits[:, -1, :], settings, generator)
        token_B = torch.where(done_B, torch.full_like(token_B, pad_id), token_B)
        tokens.append(token_B)
        done_B |= token_B == eos_id
        if step == settings.max_new_tokens - 1:
            break
        finished = bool(done_B.all())
        if (not any_rank(not finished)) if lockstep else finished:
            break
        mask_BP = torch.cat([mask_BP, torch.ones_like(mask_BP[:, :1])], dim=1)
        before_forward()
        out = model(input_ids=token_B[:, None], attention_mask=mask_BP, position_ids=next_position_B1,
                    cache=out.cache, use_cache=True, logits_to_keep=1)
        next_position_B1 = next_position_B1 + 1
    generated_BN = torch.stack(tokens, dim=1).cpu().numpy()
    rollouts = []
    for row in generated_BN:
        ends = np.flatnonzero(row == eos_id)
        rollouts.append(row[: ends[0] + 1].copy() if ends.size else row.copy())
    return rollouts


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; every submodule's own train/eval flag is restored after."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


# ---- gather-once replica ----------------------------------------

def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")


def _replica_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _copy_units(live: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """(module name, module, its (name, parameter)s) in module order: plain modules with their own parameters,
    and peft LoRA layers whole (base weight and adapters gathered together so they can be merged). Each parameter
    once (a tied weight belongs to its first module, as in ``named_parameters``)."""
    units, seen, lora_prefixes = [], set(), []
    for name, module in live.named_modules():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue
        if _is_lora_layer(module):
            lora_prefixes.append(name + ".")
            params = list(module.named_parameters())
        else:
            params = list(module.named_parameters(recurse=False))
        params = [(key, p) for key, p in params if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        if params:
            units.append((name, module, params))
    return units


def _full_shape(param: nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def _empty_replica(live: nn.Module, dev: torch.device) -> nn.Module:
    """A hook-free model of ``live``'s class and config with uninitialised storage on ``dev``; buffers copied.

    Built on the meta device: no weight initialisation, and no ``zero.Init`` (transformers applies it only in
    ``from_pretrained``/``from_config``)."""
    with torch.device("meta"):
        replica = type(live)(copy.deepcopy(live.config))
    live_shapes = {_replica_name(n): (_full_shape(p), p.dtype) for n, p in live.named_parameters()
                   if not _is_adapter_name(n)}
    replaced: dict[int, nn.Parameter] = {}
    for name, param in replica.named_parameters():
        if name not in live_shapes:
            raise RuntimeError(f"on-policy rollout: the student has no parameter for {name!r} of its own "
                               f"{type(live).__name__} config; this model wrapping is not supported by the "
                               "gather-once replica (set kd.on_policy.gather=per_token)")
        shape, dtype = live_shapes.pop(name)
        if tuple(shape) != tuple(param.shape):
            raise RuntimeError(f"on-policy rollout: {name} has shape {tuple(shape)} in the student but "
                               f"{tuple(param.shape)} in a model built from its config")
        replaced[id(param)] = nn.Parameter(torch.empty(shape, dtype=dtype, device=dev), requires_grad=False)
    if live_shapes:
        raise RuntimeError(f"on-policy rollout: student parameters {sorted(live_shapes)[:5]} have no place in a "
                           f"{type(live).__name__} built from its config (set kd.on_policy.gather=per_token)")
    for module in replica.modules():  # through every module, so tied weights stay one tensor
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = replaced[id(param)]
    live_buffers = {_replica_name(n): b for n, b in live.named_buffers()}
    for name, _ in list(replica.named_buffers()):
        prefix, _, key = name.rpartition(".")
        owner = replica.get_submodule(prefix) if prefix else replica
        owner._buffers[key] = live_buffers[name].detach().to(dev, copy=True)
    for sub in replica.modules():
        if hasattr(sub, "ds_id") or any(hasattr(p, "ds_id") for p in sub.parameters(recurse=False)):
            raise RuntimeError("on-policy rollout: the replica came out ZeRO-partitioned")
    return replica.eval().requires_grad_(False)


def _is_adapter_name(name: str) -> bool:
    return any(part.startswith(("lora_", "lora_embedding_", "lora_magnitude")) for part in name.split("."))


def _fill_unit(name: str, module: nn.Module, params: list[tuple[str, nn.Parameter]],
               replica_params: dict[str, nn.Parameter]) -> None:
    """Copy one unit's (gathered) parameters into the replica; a LoRA layer's weight gets its adapters merged."""
    prefix = f"{name}." if name else ""
    if not _is_lora_layer(module):
        for key, param in params:
            replica_params[prefix + key].copy_(param.detach())
        return
    if any(getattr(module, "use_dora", {}).get(a, False) for a in module.active_adapters):
        raise RuntimeError(f"on-policy rollout: {name} uses DoRA, which the gather-once replica does not merge "
                           "(set kd.on_policy.gather=per_token)")
    base = module.base_layer
    weight = base.weight.detach().clone()
    if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
                weight += module.get_delta_weight(adapter).to(weight.dtype)
    replica_params[prefix + "weight"].copy_(weight)
    if getattr(base, "bias", None) is not None:
        replica_params[prefix + "bias"].copy_(base.bias.detach())


def _gathered_replica(live: nn.Module, dev: torch.device) -> nn.Module:
    """The replica filled from ``live``: each partitioned parameter all-gathered once, in buckets (collective)."""
    replica = _empty_replica(live, dev)
    replica_params = dict(replica.named_parameters())
    bucket, bucket_bytes = [], 0

    def flush() -> None:
        params = [p for _, _, unit in bucket for _, p in unit]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, module, unit in bucket:
                _fill_unit(name, module, unit, replica_params)
        bucket.clear()

    for unit in _copy_units(live):
        bucket.append(unit)
        bucket_bytes += sum(_full_shape(p).numel() * p.element_size() for _, p in unit[2])
        if bucket_bytes >= GATHER_BUCKET_BYTES:
            flush()
            bucket_bytes = 0
    if bucket:
        flush()
    return replica


def _kv_cache_bytes(model: nn.Module, rows: int, tokens: int) -> int:
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * rows * tokens * kv_heads * head_dim * element


def gather_plan_bytes(live: nn.Module, prompt_ids: Sequence[np.ndarray], settings: SamplingSettings) -> int:
    """Bytes one rank needs for gather-once generation: the whole student, its KV cache, fp32 logits of a step."""
    weights = sum(_full_shape(p).numel() * p.element_size() for p in live.parameters())
    rows = max(len(prompt_ids), 1)
    longest = max((int(np.asarray(p).size) for p in prompt_ids), default=1) + settings.max_new_tokens
    vocab = int(getattr(live.config, "vocab_size", 0) or 0)
    return weights + _kv_cache_bytes(live, rows, longest) + 3 * rows * vocab * 4


def _available_bytes() -> int:
    from deepspeed.accelerator import get_accelerator

    return int(get_accelerator().available_memory())


def _check_fits(live: nn.Module, prompt_ids: Sequence[np.ndarray], settings: SamplingSettings,
                max_gather_bytes: int | None) -> None:
    """Refuse, on every rank alike, when some rank cannot hold the whole student and its cache (collective)."""
    need = gather_plan_bytes(live, prompt_ids, settings)
    limit = _available_bytes() if max_gather_bytes is None else int(max_gather_bytes)
    too_big = need > limit
    if any_rank(too_big):
        gib = 1 / 2**30
        where = (f"rank {rank()} needs {need * gib:.2f} GiB (whole student + KV cache) and has {limit * gib:.2f} "
                 f"GiB ({'kd.on_policy.max_gather_gb' if max_gather_bytes is not None else 'free device memory'})"
                 if too_big else "another rank cannot hold the whole student")
        raise RolloutMemoryError(
            f"kd.on_policy: gather-once generation does not fit: {where}. Use kd.on_policy.gather=per_token "
            "(generates through ZeRO-3's layer-by-layer gathers: bounded memory, one all-gather per layer per "
            "token), or lower kd.on_policy.max_new_tokens / data.micro_batch_size")


# ---- public entry points ----------------------------------------

def _student_lm(engines) -> nn.Module:
    return engines.student_module.causal_lm


def _is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def generate_rollouts(engines, prompt_ids: list[np.ndarray], settings: SamplingSettings, *,
                      generator: torch.Generator, eos_id: int, pad_id: int,
                      max_gather_bytes: int | None = None) -> list[np.ndarray]:
    """One rollout per prompt (student token ids, no padding; ends with ``eos_id`` when EOS was sampled, else
    exactly ``max_new_tokens`` ids). Collective-safe: every rank calls it at the same step (also with no prompt:
    the gather is a collective); it does not depend on other ranks finishing at the same token.

    Under ZeRO-3 the student is gathered once into a hook-free replica (see the module docstring), which is freed
    before returning; the live parameters stay partitioned throughout. Stages 0-2 generate with the live model.

    Args:
        engines: ``engine.build.Engines``; the student's HF causal LM is ``engines.student_module.causal_lm``.
        prompt_ids: [R] int arrays, each a prompt as the student reads it (BOS included), non-empty.
        generator: the source of every random draw (CPU or device generator); its state decides the samples.
        max_gather_bytes: refuse (``RolloutMemoryError``) when the replica and KV cache need more than this on a
            rank (``kd.on_policy.max_gather_gb``); None: the device's free memory.
    """
    live = _student_lm(engines)
    if prompt_ids:
        _check_positions(live, prompt_ids, settings)
    if not _is_partitioned(live):
        if not prompt_ids:
            return []
        with _eval_mode(live):
            return _decode(live, prompt_ids, settings, generator=generator, eos_id=eos_id, pad_id=pad_id,
                           lockstep=False)
    _check_fits(live, prompt_ids, settings, max_gather_bytes)
    replica = _gathered_replica(live, device())
    try:
        if not prompt_ids:
            return []
        return _decode(replica, prompt_ids, settings, generator=generator, eos_id=eos_id, pad_id=pad_id,
                       lockstep=False)
    finally:
        del replica
        if device().type == "cuda":
            torch.cuda.empty_cache()


def generate_rollouts_per_token_gather(engines, prompt_ids: list[np.ndarray], settings: SamplingSettings, *,
                                       generator: torch.Generator, eos_id: int, pad_id: int) -> list[np.ndarray]:
    """The same rollouts, generated through the live student's ZeRO-3 hooks (every forward all-gathers each layer,
    so every token costs a full gather of the model). It exists as the baseline of
    ``benchmarks/bench_onpolicy.py`` and as the bounded-memory fallback for a student too large to gather whole.

    The hooks' gathers are collectives, so all ranks run the same number of forwards: decoding continues until
    every row of every rank finished (one all-reduce per token) or ``max_new_tokens``; a rank without prompts
    decodes one dummy row. Same arguments and result as ``generate_rollouts``.
    """
    live = _student_lm(engines)
    rows = list(prompt_ids) if prompt_ids else [np.array([pad_id], dtype=np.int64)]
    _check_positions(live, rows, settings)
    partitioned = _is_partitioned(live)
    try:
        with _eval_mode(live):
            rollouts = _decode(live, rows, settings, generator=generator, eos_id=eos_id, pad_id=pad_id,
                               lockstep=dist.is_initialized() and partitioned,
                               before_forward=_zero3_forward_start(engines.student) if partitioned else lambda: None)
    finally:
        if partitioned:  # the coordinator keeps parameters it expects to reuse soon (stage3_max_reuse_distance)
            engines.student.empty_partition_cache()
    return rollouts if prompt_ids else []


def _zero3_forward_start(engine) -> Callable[[], None]:
    """What ZeRO-3's pre-forward hook on the engine's root module does (``reset_step`` of the parameter
    coordinator), for forwards of the inner HF model, which bypass the root (``DistillStudent``): without it the
    coordinator takes every token's forward for a continuation of one long step, its recorded module trace goes
    stale and the per-token cost becomes erratic (measured: 3 to 21 s for the same 16-token rollout)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return lambda: None
    return offload.get_param_coordinator().reset_step
