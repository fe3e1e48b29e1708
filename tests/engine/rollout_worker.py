"""Rollout checks on 2 ranks (ZeRO-3, then ZeRO-0, then a ZeRO-3 LoRA student), in ONE torchrun launch.

    torchrun --nproc_per_node 2 tests/engine/rollout_worker.py SPEC.json OUT_DIR

``SPEC.json``: ``{"student": saved tiny model dir, "tokenizer": its tokenizer dir, "zero_tuning": json path}``.
Every rank writes ``OUT_DIR/rank{r}.json`` with what it generated and what it observed; ``test_rollout.py``
asserts on those. The reference is written from the definition of greedy decoding: a plain (unpartitioned)
copy of the saved model, one prompt at a time, no padding, no KV cache, the argmax of the last position's logits
appended until ``max_new_tokens`` or EOS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from engine_helpers import reference_greedy  # this script's folder is on sys.path when it runs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

NEW_TOKENS = 10
PROMPTS = [  # rank r takes PROMPTS[r::2]: different prompt lengths in each batch (left padding)
    "Instruction: name a colour.\nResponse:",
    "Write one word",
    "Question: what is the capital of the country with the largest population in the world today?\nAnswer:",
    "A",
    "List three fruits, separated by commas, and say which one is the sweetest.",
    "Hi",
]


def truncated(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def partition_state(module) -> dict:
    """How many ZeRO-3 parameters are not partitioned / hold local data beyond their partition."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    return {"zero_params": len(params),
            "available": sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params),
            "materialised_elements": sum(p.data.numel() for p in params)}


COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_gather_base", "_all_gather_base", "all_gather_coalesced",
               "all_reduce", "inference_all_reduce", "broadcast", "reduce_scatter_tensor", "barrier")


def count_collectives(function) -> int:
    """Collective calls made while ``function()`` runs: those of DeepSpeed's comm backend (ZeRO-3's gathers; it
    captured its torch functions at start-up) and direct ``torch.distributed`` ones (our all-reduces)."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    calls = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)
        return wrapper

    patched = [(owner, name, getattr(owner, name)) for owner in (ds_comm.cdb, dist) for name in COLLECTIVES
               if hasattr(owner, name)]
    for owner, name, original in patched:
        setattr(owner, name, counted(original))
    try:
        function()
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    return calls[0]


def train_step(engines, rollouts: list[np.ndarray], prompts: list[list[int]], pad_id: int) -> dict:
    """One optimizer step of plain next-token CE on prompt + rollout (the loop's head path); returns evidence."""
    import torch.nn.functional as F

    from dskd_scale.engine.distributed import device
    from dskd_scale.engine.heads import full_copy

    rows = [list(p) + [int(t) for t in r] for p, r in zip(prompts, rollouts, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    ids, mask = ids.to(device()), mask.to(device())
    probe = engines.student_module.causal_lm.get_input_embeddings().weight
    before = full_copy(probe)
    engines.student_head.refresh()
    hidden = engines.student(ids, mask)
    keep = mask[:, 1:].bool()
    logits = engines.trainable_student_head()(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), ids[:, 1:][keep])
    engines.backward(loss)
    engines.student.step()
    after = full_copy(probe)
    return {"loss": float(loss), "applied": bool(engines.student.was_step_applied()),
            "weights_changed": bool(not torch.equal(before, after))}


def build(spec: dict, tokenizer, *, stage: int, lora: bool = False):
    from dskd_scale.config.run import EngineConfig, KDConfig, LoraConfig, ModelConfig, OptimConfig
    from dskd_scale.engine.build import build_engines

    if lora:  # a random Llama student (peft targets q_proj/v_proj), so a trained adapter changes the outputs
        student = ModelConfig(tokenizer=spec["tokenizer"], architecture="llama", hidden_size=32, num_layers=2,
                              num_heads=4, max_position_embeddings=256, init_seed=5,
                              lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    else:
        student = ModelConfig(path=spec["student"], tokenizer=spec["tokenizer"])
    engine = EngineConfig(zero_stage=stage, precision="fp32", skip_cpu_shm_op=True,
                          zero_tuning=spec["zero_tuning"] if stage == 3 else "")
    return build_engines(student_cfg=student, teacher_cfg=None, kd=KDConfig(criterion="sft"),
                         optim=OptimConfig(lr=5e-2, warmup_steps=0, max_steps=4, schedule="constant"),
                         engine_cfg=engine, micro_batch_size=2, total_steps=4, vocab_map=None,
                         needs_projectors=False, student_tokenizer=tokenizer)


def as_lists(rollouts: list[np.ndarray]) -> list[list[int]]:
    return [[int(t) for t in r] for r in rollouts]


def main(spec_path: str, out_dir: str) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_scale.engine.distributed import init_distributed
    from dskd_scale.engine.rollout import (
        RolloutMemoryError,
        SamplingSettings,
        generate_rollouts,
        generate_rollouts_per_token_gather,
    )

    spec = json.loads(Path(spec_path).read_text())
    rank, world = init_distributed(skip_cpu_shm_op=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS[rank::world]]
    prompt_arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    # The plain copy is loaded before any engine exists (no HfDeepSpeedConfig alive: nothing partitioned).
    plain = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).eval()
    never = -1  # an eos id no token has: every rollout runs to max_new_tokens
    reference = [reference_greedy(plain, p, NEW_TOKENS, never) for p in prompts]
    # EOS: a token rank r's first row generates (at step 1 + 2r or earlier).
    eos_id = reference[0][1 + 2 * rank]
    greedy = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0)
    sampled = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9)
    result: dict = {"rank": rank, "prompts": prompts, "reference": reference, "eos_id": eos_id,
                    "reference_eos": [truncated(r, eos_id) for r in reference], "new_tokens": NEW_TOKENS}

    def run(engines, settings, seed, *, eos=never, per_token=False):
        function = generate_rollouts_per_token_gather if per_token else generate_rollouts
        generator = torch.Generator().manual_seed(seed)
        return as_lists(function(engines, prompt_arrays, settings, generator=generator, eos_id=eos, pad_id=pad_id))

    # ---- ZeRO-3 ----
    engines = build(spec, tokenizer, stage=3)
    engines.student.train()
    result["z3_partition_before"] = partition_state(engines.student_module)
    result["z3_greedy"] = run(engines, greedy, 0)
    result["z3_greedy_per_token"] = run(engines, greedy, 0, per_token=True)
    result["z3_eos"] = run(engines, greedy, 0, eos=eos_id)
    result["z3_eos_per_token"] = run(engines, greedy, 0, eos=eos_id, per_token=True)
    # Uneven ranks: rank 0 decodes one prompt that ends at its first token, rank 1 runs every prompt to the end.
    uneven_prompts = prompt_arrays[:1] if rank == 0 else prompt_arrays
    uneven_eos = reference[0][0] if rank == 0 else never
    result["uneven_expected"] = [reference[0][:1]] if rank == 0 else reference
    for per_token, function in ((False, generate_rollouts), (True, generate_rollouts_per_token_gather)):
        result[f"z3_uneven_per_token_{per_token}"] = as_lists(function(
            engines, uneven_prompts, greedy, generator=torch.Generator(), eos_id=uneven_eos, pad_id=pad_id))
    result["z3_sample_a"] = run(engines, sampled, 123)
    result["z3_sample_b"] = run(engines, sampled, 123)
    result["z3_sample_other_seed"] = run(engines, sampled, 124)
    result["z3_sample_per_token"] = run(engines, sampled, 123, per_token=True)
    result["z3_top_k1"] = run(engines, SamplingSettings(max_new_tokens=NEW_TOKENS, top_k=1), 5)
    empty_generator = torch.Generator().manual_seed(0)  # a rank without prompts still joins the gather
    result["z3_empty_rank"] = as_lists(generate_rollouts(engines, [] if rank == 1 else prompt_arrays, greedy,
                                                         generator=empty_generator, eos_id=never, pad_id=pad_id))
    for per_token in (False, True):  # collectives per call, for a short and a long rollout
        result[f"z3_collectives_per_token_{per_token}"] = [count_collectives(lambda n=n, p=per_token, e=engines: run(
            e, SamplingSettings(max_new_tokens=n, temperature=0.0), 0, per_token=p)) for n in (2, 8)]
    for name, limit in (("z3_refused_all", 1), ("z3_refused_rank1", 1 if rank == 1 else 1 << 40)):
        try:
            generate_rollouts(engines, prompt_arrays, greedy, generator=torch.Generator(), eos_id=never,
                              pad_id=pad_id, max_gather_bytes=limit)
            result[name] = None
        except RolloutMemoryError as error:
            result[name] = str(error)
    result["z3_partition_after"] = partition_state(engines.student_module)
    result["z3_all_training"] = all(m.training for m in engines.student_module.modules())
    result["z3_step"] = train_step(engines, [np.asarray(r) for r in result["z3_greedy"]], prompts, pad_id)
    result["z3_after_step"] = run(engines, greedy, 0)
    result["z3_after_step_per_token"] = run(engines, greedy, 0, per_token=True)
    result["z3_partition_end"] = partition_state(engines.student_module)
    del engines

    # ---- ZeRO-0: the live model generates ----
    engines = build(spec, tokenizer, stage=0)
    engines.student.train()
    result["z0_greedy"] = run(engines, greedy, 0)
    result["z0_eos"] = run(engines, greedy, 0, eos=eos_id)
    result["z0_sample_a"] = run(engines, sampled, 123)
    result["z0_all_training"] = all(m.training for m in engines.student_module.modules())
    result["z0_step"] = train_step(engines, [np.asarray(r) for r in result["z0_greedy"]], prompts, pad_id)
    del engines

    # ---- ZeRO-3 LoRA: adapters merged into the replica equal the live (unmerged) adapters ----
    engines = build(spec, tokenizer, stage=3, lora=True)
    engines.student.train()
    result["lora_before"] = run(engines, greedy, 0)
    for _ in range(2):  # LoRA B starts at zero: train it so the adapters matter
        result.setdefault("lora_steps", []).append(
            train_step(engines, [np.asarray(r) for r in result["z3_greedy"]], prompts, pad_id))
    result["lora_greedy"] = run(engines, greedy, 0)
    result["lora_greedy_per_token"] = run(engines, greedy, 0, per_token=True)
    result["lora_partition_after"] = partition_state(engines.student_module)
    del engines

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    exit_code = main(*sys.argv[1:3])
    from dskd_scale.engine.distributed import barrier, shutdown

    # Leave the process group together: exiting with gloo's threads alive can abort a rank at teardown
    # ("terminate called without an active exception").
    barrier()
    shutdown()
    sys.exit(exit_code)
