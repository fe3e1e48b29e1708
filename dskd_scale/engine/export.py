"""Export the student as a Hugging Face folder (``from_pretrained`` works, tokenizer included) and the
projectors as ``projectors.safetensors``; in-run (end of training) or offline from a checkpoint.

Output folder::

    config.json, model.safetensors, tokenizer files     the student (LoRA adapters merged into the weights)
    projectors.safetensors                              t2s_projector.weight [D, E] (+ s2t_projector.weight)
    probe.pt                                            {"input_ids", "logits"}: the live model's logits on a
                                                        fixed probe, so a reload can be checked for identity
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from dskd_scale.engine.distributed import barrier, rank
from dskd_scale.models.build import causal_lm_of
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)

PROJECTOR_PREFIXES = ("t2s_projector.", "s2t_projector.")
PROBE_TEXT = "Below is an instruction that describes a task. Write a response that completes the request."
_LORA_A = re.compile(r"^(.*)\.lora_A\.[^.]+\.weight$")


def split_state_dict(wrapper_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``DistillStudent`` state -> (student causal-LM state, projector state)."""
    student, projectors = {}, {}
    for key, value in wrapper_state.items():
        if key.startswith(PROJECTOR_PREFIXES):
            projectors[key] = value.contiguous()
        elif key.startswith("student."):
            student[key[len("student."):]] = value
    return student, projectors


def merge_lora_state(state: dict[str, Tensor], *, scaling: float) -> dict[str, Tensor]:
    """Fold peft LoRA pairs into their base weights (``W += scaling * B @ A``) and drop peft's key prefixes.

    A state without LoRA keys is returned unchanged.
    """
    if not any(_LORA_A.match(key) for key in state):
        return state
    merged = dict(state)
    for key in list(state):
        match = _LORA_A.match(key)
        if not match:
            continue
        stem = match.group(1)
        lora_b = key.replace(".lora_A.", ".lora_B.")
        base = f"{stem}.base_layer.weight"
        delta = (state[lora_b].float() @ state[key].float()) * scaling  # [out, in]
        if delta.shape != state[base].shape and delta.T.shape == state[base].shape:
            delta = delta.T  # GPT-2 Conv1D stores [in, out] (peft's fan_in_fan_out)
        merged[base] = (state[base].float() + delta).to(state[base].dtype)
    clean = {}
    for key, value in merged.items():
        if ".lora_" in key:
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        clean[key] = value
    return clean


def _lora_scaling(student) -> float | None:
    peft_config = getattr(student, "peft_config", None)
    if not peft_config:
        return None
    adapter = next(iter(peft_config.values()))
    return adapter.lora_alpha / adapter.r


def write_export(causal_lm, tokenizer, student_state: dict[str, Tensor], projector_state: dict[str, Tensor],
                 out_dir: Path, probe: dict[str, Tensor] | None) -> None:
    """Write the folder (one process)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    causal_lm.save_pretrained(str(out_dir), state_dict=student_state, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if projector_state:
        save_file(projector_state, str(out_dir / "projectors.safetensors"),
                  metadata={"format": "dskd_scale.projectors", "layout": "weight [out, in], y = x @ W^T"})
    if probe is not None:
        torch.save(probe, out_dir / "probe.pt")


def probe_ids(tokenizer) -> Tensor:
    return torch.tensor([tokenizer(PROBE_TEXT)["input_ids"][:16]], dtype=torch.long)


def export_student(engines, out_dir: Path) -> None:
    """Collective: gather the student + projectors layer by layer to rank 0 and write the export folder."""
    engine = engines.student
    module = engine.module
    if engine.zero_optimization_partition_weights():
        wrapper_state = engine._zero3_consolidated_16bit_state_dict()
    else:
        wrapper_state = module.state_dict() if rank() == 0 else None
    ids = probe_ids(engines.student_tokenizer)
    was_training = module.training
    module.eval()
    with torch.no_grad():  # every rank runs the forward: ZeRO-3 gathers are collective
        logits = module.causal_lm(input_ids=ids.to(next(module.parameters()).device)).logits.float().cpu()
    module.train(was_training)
    if rank() == 0:
        student_state, projector_state = split_state_dict(wrapper_state)
        scaling = _lora_scaling(module.student)
        if scaling is not None:
            student_state = merge_lora_state(student_state, scaling=scaling)
        write_export(causal_lm_of(module.student), engines.student_tokenizer, student_state, projector_state,
                     out_dir, {"input_ids": ids, "logits": logits})
        log.info("exported the student to %s", out_dir)
    barrier()


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_from_checkpoint(tag_dir: Path, out_dir: Path, dtype: str | None = None) -> str:
    """Offline, one process: ZeRO partitions -> fp32 state -> HF folder (student rebuilt from run_config.yaml).

    ``dtype`` (``fp32`` | ``bf16`` | ``fp16``) is what the weights and projectors are saved in; None means the
    run's ``engine.precision`` (what the in-run export writes too). The conversion rounds the fp32 master
    weights once; the probe logits are those of the saved (rounded) model. Returns the dtype name used.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dskd_scale.config.loader import load_config
    from dskd_scale.config.run import RunConfig
    from dskd_scale.models.build import build_causal_lm, load_tokenizer

    tag_dir = Path(tag_dir)
    cfg = load_config(RunConfig, tag_dir / "run_config.yaml")
    dtype = dtype or cfg.engine.precision
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    wrapper_state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    student_state, projector_state = split_state_dict(wrapper_state)
    tokenizer = load_tokenizer(cfg.student.tokenizer_path, key="student.tokenizer")
    model = build_causal_lm(cfg.student, tokenizer, dtype=torch.float32, key="student")
    if cfg.student.lora.enabled:
        student_state = merge_lora_state(student_state, scaling=cfg.student.lora.alpha / cfg.student.lora.r)
    missing, unexpected = model.load_state_dict(student_state, strict=False)
    tied = {key for key in missing if key.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{tag_dir}: checkpoint does not match the student config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    torch_dtype = EXPORT_DTYPES[dtype]
    model = model.to(torch_dtype).eval()
    projector_state = {key: value.to(torch_dtype) if value.is_floating_point() else value
                       for key, value in projector_state.items()}
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    write_export(model, tokenizer, model.state_dict(), projector_state, out_dir, {"input_ids": ids, "logits": logits})
    return dtype
