"""Student rollouts (``engine/rollout.py``): sampling maths on hand-made logits, and 2-rank ZeRO-3 generation.

Ports 29740-29749. The 2-rank checks run in ONE torchrun launch of ``rollout_worker.py`` (ZeRO-3, ZeRO-0 and a
ZeRO-3 LoRA student), each rank writing what it generated; the tests below assert on those records.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import PROJECT_ROOT, TIMEOUT_S, check, reference_greedy, run_env

from dskd_scale.engine.rollout import SamplingSettings, filtered_probs, next_tokens, sample_from

P = [0.5, 0.25, 0.15, 0.1]


def _logits(probs) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log().float()


def _settings(**kwargs) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=4, **kwargs)


# ---- sampling maths (no DeepSpeed engine) ----------------------------------------

@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, P),
    ({"top_k": 2}, [2 / 3, 1 / 3, 0, 0]),
    ({"top_p": 0.3}, [1, 0, 0, 0]),  # the most likely token alone already holds 0.5 >= 0.3
    ({"top_p": 0.7}, [2 / 3, 1 / 3, 0, 0]),  # mass before token 2 is 0.75 >= 0.7
    ({"top_p": 0.8}, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),  # mass before token 3 is 0.9
    ({"top_k": 2, "top_p": 0.6}, [1, 0, 0, 0]),  # top-k first: (2/3, 1/3), then 2/3 >= 0.6
    ({"temperature": 2.0}, [p ** 0.5 / sum(q ** 0.5 for q in P) for p in P]),
    ({"temperature": 0.5}, [p ** 2 / sum(q ** 2 for q in P) for p in P]),
    ({"temperature": 0.5, "top_k": 3}, [p ** 2 / sum(q ** 2 for q in P[:3]) for p in P[:3]] + [0]),
])
def test_filtered_probs_golden(kwargs, expected):
    probs = filtered_probs(_logits(P), _settings(**kwargs))
    assert probs.dtype == torch.float32
    # fp32 softmax of fp32 logits: a few ulps of 1 per value
    torch.testing.assert_close(probs[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0,
                               atol=8 * torch.finfo(torch.float32).eps)


def test_top_k_keeps_ties_and_rows_are_independent():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    probs = filtered_probs(logits, _settings(top_k=1))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))


@pytest.mark.parametrize(("uniform", "token"), [(0.0, 0), (0.2499, 0), (0.25, 2), (0.7499, 2), (0.75, 3),
                                                (0.999999, 3)])
def test_inverse_cdf_sampling_golden(uniform, token):
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25]])  # cumulative 0.25, 0.25, 0.75, 1 (exact in binary)
    assert sample_from(probs, torch.tensor([uniform], dtype=torch.float64)).tolist() == [token]


def test_sampling_follows_the_filtered_distribution_and_draws_one_uniform_per_row():
    settings = _settings(top_k=3)
    logits = _logits(P).repeat(4000, 1)
    generator = torch.Generator().manual_seed(11)
    twin = torch.Generator().manual_seed(11)
    tokens = next_tokens(logits, settings, generator)
    torch.rand(4000, generator=twin, dtype=torch.float64)
    assert torch.equal(generator.get_state(), twin.get_state())  # exactly one uniform per row was drawn
    frequency = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9
    # 4000 draws: the standard deviation of each frequency is below 0.008; 0.04 is five of them
    torch.testing.assert_close(frequency, expected.double(), rtol=0, atol=0.04)
    assert frequency[3] == 0  # a filtered token is never drawn
    again = next_tokens(logits, settings, torch.Generator().manual_seed(11))
    assert torch.equal(again, tokens)


def test_greedy_is_argmax_and_draws_nothing():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 4.5]])
    assert next_tokens(logits, _settings(temperature=0.0), generator).tolist() == [1, 0]
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize(("kwargs", "message"), [({"max_new_tokens": 0}, "max_new_tokens"),
                                                 ({"temperature": -1.0}, "temperature"),
                                                 ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k")])
def test_bad_settings_name_the_key(kwargs, message):
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=f"kd.on_policy: .*{message}"):
        SamplingSettings(**arguments)


def test_prompt_plus_new_tokens_beyond_the_positions_is_refused():
    from types import SimpleNamespace

    from dskd_scale.engine.rollout import _check_positions

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8))
    _check_positions(model, [np.arange(4)], _settings())  # 4 + 4 positions fit
    with pytest.raises(ValueError, match="kd.on_policy.max_new_tokens: a prompt of 5 tokens"):
        _check_positions(model, [np.arange(2), np.arange(5)], _settings())


# ---- one process, unpartitioned model (the ZeRO-0/1/2 path) ----------------------------------------

@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_padded_kv_cache_decoding_equals_unpadded_greedy_on_a_plain_model(architecture):
    """Rotary (Llama) and learned (GPT-2) positions: left padding with position ids counted from each row's first
    token, and the KV cache, give the per-prompt greedy tokens; dropout is off while decoding, and every module's
    train flag is restored after."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from dskd_scale.engine.rollout import generate_rollouts

    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                             attention_dropout=0.5)
    else:
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.5,
                            embd_pdrop=0.5, attn_pdrop=0.5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prompts = [np.array([5, 9, 11, 3, 7, 8, 2]), np.array([4]), np.array([30, 31, 32])]
    model.eval()
    reference = [reference_greedy(model, p.tolist(), 6, eos_id=-1) for p in prompts]
    model.train()
    engines = SimpleNamespace(student_module=SimpleNamespace(causal_lm=model))
    got = generate_rollouts(engines, prompts, SamplingSettings(max_new_tokens=6, temperature=0.0),
                            generator=torch.Generator(), eos_id=-1, pad_id=0)
    assert [row.tolist() for row in got] == reference
    assert all(module.training for module in model.modules())
    eos = reference[1][2]  # row 1 stops at its third token (or earlier, where it sampled that id before)
    got = generate_rollouts(engines, prompts, SamplingSettings(max_new_tokens=6, temperature=0.0),
                            generator=torch.Generator(), eos_id=eos, pad_id=0)
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in reference]
    assert [row.tolist() for row in got] == expected and got[1][-1] == eos


# ---- 2 ranks ----------------------------------------

@pytest.fixture(scope="module")
def ranks(demo, tmp_path_factory) -> list[dict]:
    """Both ranks' records of one ``rollout_worker.py`` launch (2 ranks, gloo, port 29740)."""
    work = tmp_path_factory.mktemp("rollout")
    spec = work / "spec.json"
    spec.write_text(json.dumps({"student": str(demo["student"]), "tokenizer": str(demo["student_tokenizer"]),
                                "zero_tuning": str(PROJECT_ROOT / "configs/deepspeed/zero3_partition_all.json")}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", "29740", str(Path(__file__).with_name("rollout_worker.py")), str(spec), str(work)]
    check(subprocess.run(command, cwd=PROJECT_ROOT, env=run_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S))
    return [json.loads((work / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.dist
def test_gather_once_greedy_equals_unpartitioned_reference(ranks):
    """ZeRO-3 gather-once, the per-token ZeRO-3 path and ZeRO-0 all equal greedy decoding of a plain copy of the
    same weights (one prompt at a time, no padding, no KV cache), token for token, on both ranks."""
    for record in ranks:
        reference = record["reference"]
        assert all(len(row) == record["new_tokens"] for row in reference)  # no EOS: max_new_tokens exactly
        assert record["z3_greedy"] == reference
        assert record["z3_greedy_per_token"] == reference
        assert record["z0_greedy"] == reference
        assert record["z3_top_k1"] == reference  # sampling restricted to the argmax is greedy


@pytest.mark.dist
def test_rows_stop_at_eos_and_ranks_stop_at_different_tokens(ranks):
    for record in ranks:
        expected = record["reference_eos"]
        assert expected[0][-1] == record["eos_id"]
        for key in ("z3_eos", "z3_eos_per_token", "z0_eos"):
            assert record[key] == expected, key
        assert all(row[-1] == record["eos_id"] or len(row) == record["new_tokens"] for row in record["z3_eos"])
        # rank 0 finished all its rows after one token while rank 1 ran to max_new_tokens: the per-token path
        # (collectives every token) kept rank 0 in step instead of deadlocking, and both paths agree
        for per_token in (False, True):
            assert record[f"z3_uneven_per_token_{per_token}"] == record["uneven_expected"], per_token
    assert len(ranks[0]["uneven_expected"]) == 1 and len(ranks[0]["uneven_expected"][0]) == 1
    assert all(len(row) == ranks[1]["new_tokens"] for row in ranks[1]["uneven_expected"])


@pytest.mark.dist
def test_sampling_is_reproducible_from_the_generator_state(ranks):
    for record in ranks:
        assert record["z3_sample_a"] == record["z3_sample_b"]
        assert record["z3_sample_a"] != record["z3_sample_other_seed"]
        # the same draws through the live ZeRO-3 module and through ZeRO-0: the same maths, the same samples
        assert record["z3_sample_per_token"] == record["z3_sample_a"]
        assert record["z0_sample_a"] == record["z3_sample_a"]
        assert all(len(row) == record["new_tokens"] for row in record["z3_sample_a"])
    assert ranks[0]["z3_sample_a"] != ranks[1]["z3_sample_a"]  # different prompts


@pytest.mark.dist
def test_gather_once_collectives_do_not_grow_with_the_rollout_length(ranks):
    for record in ranks:
        once_short, once_long = record["z3_collectives_per_token_False"]
        hooks_short, hooks_long = record["z3_collectives_per_token_True"]
        zero_params = record["z3_partition_before"]["zero_params"]
        assert once_short == once_long and 0 < once_short <= zero_params + 1
        assert hooks_long - hooks_short >= 2 * 6  # 6 more tokens: at least a gather and an all-reduce each


@pytest.mark.dist
def test_parameters_stay_partitioned_and_training_steps_after_rollouts(ranks):
    for record in ranks:
        for key in ("z3_partition_before", "z3_partition_after", "z3_partition_end", "lora_partition_after"):
            state = record[key]
            assert state["zero_params"] > 0 and state["available"] == 0 and state["materialised_elements"] == 0, key
        assert record["z3_all_training"] and record["z0_all_training"]  # train mode restored
        for key in ("z3_step", "z0_step"):
            step = record[key]
            assert step["applied"] and step["weights_changed"] and math.isfinite(step["loss"]), key
        # the next rollout reads the updated weights (gather-once equals the live module after the step)
        assert record["z3_after_step"] == record["z3_after_step_per_token"]
        assert record["z3_after_step"] != record["z3_greedy"]
    assert ranks[1]["z3_empty_rank"] == []  # a rank without prompts joined the gather and got nothing back
    assert ranks[0]["z3_empty_rank"] == ranks[0]["reference"]


@pytest.mark.dist
def test_lora_adapters_are_merged_into_the_replica(ranks):
    for record in ranks:
        assert all(step["applied"] for step in record["lora_steps"])
        assert record["lora_greedy"] == record["lora_greedy_per_token"]
    # the trained adapters change the greedy tokens, so an unmerged replica could not pass the check above
    assert any(record["lora_greedy_per_token"] != record["lora_before"] for record in ranks)


@pytest.mark.dist
def test_a_student_too_large_to_gather_is_refused_on_every_rank(ranks):
    for record in ranks:
        for key in ("z3_refused_all", "z3_refused_rank1"):
            message = record[key]
            assert message is not None and "kd.on_policy" in message and "gather=per_token" in message, key
    assert "kd.on_policy.max_gather_gb" in ranks[1]["z3_refused_rank1"]
    assert "another rank" in ranks[0]["z3_refused_rank1"]  # the rank that fits refuses too: no hang
