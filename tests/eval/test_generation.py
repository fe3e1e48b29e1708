"""Generation: left padding is exact, keyed sampling is batch-invariant, stop strings and truncation work."""

from __future__ import annotations

import os

import pytest
import torch

from dskd_scale.eval.config import SamplingConfig
from dskd_scale.eval.distributed import DistContext, plan_batches
from dskd_scale.eval.generation import (
    GREEDY,
    _finish_row,
    _StopOnStrings,
    encode_prompts,
    generate_batch,
    generate_shard,
)
from dskd_scale.eval.loading import ensure_pad_token
from dskd_scale.eval.sampling import CounterGumbelNoise, counter_uniform

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "Question: two plus two?\nAnswer:"]
ONE_RANK = DistContext(0, 1, 0)


def test_counter_noise_is_uniform_and_keyed():
    uniform = counter_uniform(10, torch.arange(2000), 3, 500)
    assert 0 < uniform.min() and uniform.max() < 1
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.std().item() == pytest.approx((1 / 12) ** 0.5, abs=0.01)
    same = counter_uniform(10, torch.tensor([7, 1999]), 3, 500)
    assert torch.equal(same, uniform[[7, 1999]])  # a row depends on its key only, not on the batch
    assert not torch.equal(counter_uniform(11, torch.arange(2000), 3, 500), uniform)
    assert not torch.equal(counter_uniform(10, torch.arange(2000), 4, 500), uniform)


def test_gumbel_argmax_samples_from_the_softmax():
    logits_V = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    rows = 40000
    noise = CounterGumbelNoise(seed=3, keys_B=torch.arange(rows), prompt_length=0)
    choices = noise(torch.zeros((rows, 0), dtype=torch.long), logits_V.expand(rows, -1).clone()).argmax(-1)
    frequencies = torch.bincount(choices, minlength=5).double() / rows
    assert torch.allclose(frequencies, logits_V.double().softmax(0), atol=0.01)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompt_ids, _ = encode_prompts(tokenizer, PROMPTS, 512)
    batched = generate_batch(model, tokenizer, prompt_ids, [0, 1, 2], sampling=GREEDY, seed=0, max_new_tokens=12)
    for row, ids in enumerate(prompt_ids):
        alone = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(alone[0, len(ids):], skip_special_tokens=True)
        assert batched[row][0] == expected


def test_checkpoint_generation_defaults_do_not_leak_into_the_protocol(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompt_ids, _ = encode_prompts(tokenizer, PROMPTS, 512)
    clean = generate_batch(model, tokenizer, prompt_ids, [0, 1, 2], sampling=GREEDY, seed=0, max_new_tokens=12)
    saved = model.generation_config
    model.generation_config = type(saved).from_dict({**saved.to_dict(), "repetition_penalty": 50.0,
                                                     "no_repeat_ngram_size": 1, "do_sample": True})  # fmt: skip
    try:
        leaked = generate_batch(model, tokenizer, prompt_ids, [0, 1, 2], sampling=GREEDY, seed=0, max_new_tokens=12)
        hf_default = model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=12, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    finally:
        model.generation_config = saved
    assert leaked == clean
    # the bait is real: plain HF generate does apply the checkpoint's penalties
    assert tokenizer.decode(hf_default[0, len(prompt_ids[0]):], skip_special_tokens=True) != clean[0][0]


def test_sampling_does_not_depend_on_batch_size_but_on_seed(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    sampling = SamplingConfig()
    common = dict(sampling=sampling, max_new_tokens=10, max_prompt_tokens=512, context=ONE_RANK)
    one = generate_shard(model, tokenizer, PROMPTS, [5, 6, 7], seed=10, batch_size=1, **common)
    three = generate_shard(model, tokenizer, PROMPTS, [5, 6, 7], seed=10, batch_size=3, **common)
    other_seed = generate_shard(model, tokenizer, PROMPTS, [5, 6, 7], seed=20, batch_size=3, **common)
    assert [one[i].text for i in range(3)] == [three[i].text for i in range(3)]
    assert [other_seed[i].text for i in range(3)] != [three[i].text for i in range(3)]
    greedy = generate_shard(model, tokenizer, PROMPTS, [5, 6, 7], seed=10, batch_size=3,
                            **{**common, "sampling": SamplingConfig(greedy=True)})
    assert [greedy[i].text for i in range(3)] != [three[i].text for i in range(3)]


def test_prompts_are_truncated_from_the_left_and_counted(gpt2_tokenizer, asset):
    ids, truncated = encode_prompts(gpt2_tokenizer, ["one two three four five six", "one"], 3)
    full = gpt2_tokenizer("one two three four five six")["input_ids"]
    assert ids[0] == full[-3:] and truncated == [True, False]
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(asset("tokenizers/llama2"))
    ids, truncated = encode_prompts(llama, ["one two three four five six seven"], 4)
    assert ids[0][0] == llama.bos_token_id and len(ids[0]) == 4 and truncated == [True]


def test_stop_strings_and_eos_end_a_row(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = {tok.eos_token_id}
    ids = tok("x = 1\nQuestion: next")["input_ids"]
    assert _finish_row(tok, ids, eos, ("Question:",)) == ("x = 1\n", len(ids), "stop")
    assert _finish_row(tok, ids[:3] + [tok.eos_token_id] + ids[3:], eos, ()) == (tok.decode(ids[:3]), 3, "eos")
    assert _finish_row(tok, ids, eos, ("[DONE]",))[2] == "length"
    # the criterion looks only at generated tokens: a stop string inside the prompt does not stop the row
    prompt = tok("Question: what?\nAnswer:")["input_ids"]
    criterion = _StopOnStrings(tok, ("Question:",), prompt_length=len(prompt))
    stops = torch.tensor([prompt + tok(" 4\n\nQuestion:")["input_ids"]])
    goes_on = torch.tensor([prompt + tok(" 4 and then five")["input_ids"]])
    assert criterion(stops[:, : len(prompt) + 2], None).tolist() == [False]
    assert criterion(stops, None).tolist() == [True]
    assert criterion(goes_on, None).tolist() == [False]


def test_pad_token_is_set_safely(gpt2_tokenizer):
    class NoSpecials:
        name_or_path = "none"
        pad_token_id = None
        eos_token = unk_token = None

    assert gpt2_tokenizer.pad_token == gpt2_tokenizer.eos_token and gpt2_tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        ensure_pad_token(NoSpecials())


def test_batches_are_planned_globally_and_dealt_round_robin():
    batches = plan_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_plain_srun_tasks_become_ranks_only_with_a_rendezvous_address(monkeypatch):
    from dskd_scale.eval.distributed import _adopt_slurm_env

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        # setenv first so monkeypatch records the variable and removes what _adopt_slurm_env writes afterwards;
        # a bare delenv of an absent variable records nothing, and RANK=3 would leak into every later test.
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    _adopt_slurm_env()
    assert "WORLD_SIZE" not in os.environ  # no MASTER_ADDR: stay a single process
    monkeypatch.setenv("MASTER_ADDR", "node01")
    _adopt_slurm_env()
    env = os.environ
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"]) == ("4", "3", "1")
