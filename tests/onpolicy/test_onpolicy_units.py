"""On-policy pieces without DeepSpeed: the per-step coin and rollout seeds, on-policy micro-batches built from
hand-made rollouts on the demo tokenizers, the config checks, and the loss of a step without gold labels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dskd_scale.config.loader import ConfigError, build_config
from dskd_scale.config.run import KDConfig, OnPolicyConfig, RunConfig
from dskd_scale.criteria import batch_rows, combine, compute_terms, local_counts
from dskd_scale.data.collate import Collator
from dskd_scale.onpolicy import is_on_policy_step, plan_rollouts, rollout_generator_seed, rollout_micro_batches
from dskd_scale.onpolicy.batch import rates

# ---------------------------------------------------------------- the coin and the rollout seeds


def test_coin_is_a_function_of_seed_and_step_so_a_resume_continues_the_sequence():
    whole = [is_on_policy_step(10, step, 0.5) for step in range(400)]
    resumed = [is_on_policy_step(10, step, 0.5) for step in range(150, 400)]  # a run resumed at step 150
    assert resumed == whole[150:]
    assert whole != [is_on_policy_step(11, step, 0.5) for step in range(400)]  # the seed matters
    # Binomial(400, 0.5): 5 standard deviations is 50 steps either way.
    assert abs(sum(whole) - 200) < 50
    share = sum(is_on_policy_step(3, step, 0.2) for step in range(2000)) / 2000
    assert abs(share - 0.2) < 5 * (0.2 * 0.8 / 2000) ** 0.5
    assert not any(is_on_policy_step(10, step, 0.0) for step in range(200))
    assert all(is_on_policy_step(10, step, 1.0) for step in range(200))


def test_rollout_seeds_differ_by_rank_and_step_and_repeat_exactly():
    seeds = {(rank, step): rollout_generator_seed(10, rank, step) for rank in range(4) for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert seeds[(1, 7)] == rollout_generator_seed(10, 1, 7)
    draws = [torch.rand(3, generator=torch.Generator().manual_seed(seeds[(0, 5)])) for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


# ---------------------------------------------------------------- config


VALID = {"data": {"train_dir": "x"}, "teacher": {"architecture": "llama", "tokenizer": "t"},
         "student": {"architecture": "gpt2", "tokenizer": "s"}}


def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(RunConfig, VALID, overrides)
    return str(err.value)


def test_config_names_the_on_policy_keys():
    message = _problems(["kd.on_policy.ratio=1.5", "kd.on_policy.max_new_tokens=0", "kd.on_policy.top_p=0",
                         "kd.on_policy.top_k=-1", "kd.on_policy.temperature=-1", "kd.on_policy.whitespace=loose",
                         "kd.on_policy.gather=all", "kd.on_policy.max_gather_gb=-1"])
    for key in ("ratio", "max_new_tokens", "top_p", "top_k", "temperature", "whitespace", "gather", "max_gather_gb"):
        assert f"kd.on_policy.{key}" in message, key
    for criterion in ("sft", "uld", "dskd_cma", "mined"):
        extra = ["kd.mined_map=m"] if criterion == "mined" else []
        message = _problems([f"kd.criterion={criterion}", "kd.on_policy.ratio=0.5", *extra])
        assert "kd.on_policy.ratio=0.5 needs kd.criterion in vanilla_kd, dskd, dskd_eta" in message
    assert "unknown key; did you mean 'ratio'" in _problems(["kd.on_policy.ration=0.5"])
    cfg = build_config(RunConfig, VALID, ["kd.criterion=dskd_eta", "kd.on_policy.ratio=0.5"])
    assert cfg.kd.on_policy.enabled and cfg.kd.on_policy.whitespace == ""
    assert not build_config(RunConfig, VALID).kd.on_policy.enabled


def test_config_refuses_on_policy_with_a_teacher_cache():
    message = _problems(["kd.on_policy.ratio=1", "teacher.cache_dir=cache", "teacher.path=t"])
    assert "kd.on_policy.ratio=1.0 needs the live teacher" in message


def _model(positions: int):
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions))


def test_plan_refuses_rollouts_longer_than_the_models_and_takes_the_manifest_whitespace():
    manifest = {"max_length": 96, "alignment": {"whitespace": "paper"}}
    plan = plan_rollouts(OnPolicyConfig(ratio=1.0, max_new_tokens=32), manifest, _model(128), _model(256))
    assert plan.whitespace == "paper" and plan.teacher_max_positions == 256
    plan = plan_rollouts(OnPolicyConfig(ratio=1.0, max_new_tokens=32, whitespace="exact"), manifest, _model(128),
                         _model(256))
    assert plan.whitespace == "exact"
    with pytest.raises(ValueError, match=r"kd.on_policy.max_new_tokens=40: .* 136 tokens .* student's 128 positions; "
                                         r"lower kd.on_policy.max_new_tokens to at most 32"):
        plan_rollouts(OnPolicyConfig(ratio=1.0, max_new_tokens=40), manifest, _model(128), _model(256))


# ---------------------------------------------------------------- on-policy micro-batches from given rollouts


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from dskd_scale.demo import build_demo_assets

    paths = build_demo_assets(tmp_path_factory.mktemp("onpolicy_demo"), seed=7, train=16, valid=1, test=1)
    loaded = {side: AutoTokenizer.from_pretrained(str(paths[f"{side}_tokenizer"])) for side in ("student", "teacher")}
    return {**loaded, "paths": paths}


PROMPTS = ["Question: name a city.\nAnswer:", "Say yes or no:", "Count to three:", "A repeat slot:"]
GOLD = [" Paris.", " no", " one two three", " filler"]


def _gold_micro(student, teacher) -> list[dict[str, torch.Tensor]]:
    """Two gold micro-batches of two rows each (labels on the response); the last row is a repeat slot."""
    examples = []
    for index, (prompt, response) in enumerate(zip(PROMPTS, GOLD, strict=True)):
        example = {"example_index": index, "is_repeat": index == 3}
        for side, tok in (("student", student), ("teacher", teacher)):
            prompt_ids = tok(prompt)["input_ids"]
            response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            example[f"{side}_input_ids"] = np.array(prompt_ids + response_ids)
            example[f"{side}_labels"] = np.array([-100] * len(prompt_ids) + response_ids)
        example["align_student"] = example["align_teacher"] = np.zeros(0, dtype=np.int64)
        examples.append(example)
    collate = Collator(student.pad_token_id or 0, teacher.pad_token_id or 0)
    return [collate(examples[:2]), collate(examples[2:])]


def _token_bytes(tok, token_id: int) -> bytes:
    from dskd_scale.alignment.token_bytes import token_table

    return token_table(tok).bytes_array[token_id]


@pytest.mark.parametrize("same_vocab", [False, True])
def test_rollout_batches_have_no_labels_align_the_samples_and_count(tokenizers, same_vocab):
    student = tokenizers["student"]
    teacher = student if same_vocab else tokenizers["teacher"]
    eos = student.eos_token_id
    sampled = [student(" Paris is large.", add_special_tokens=False)["input_ids"] + [eos],  # ended with EOS
               student(" yes indeed", add_special_tokens=False)["input_ids"],  # hit max_new_tokens: no EOS
               [eos]]  # empty: EOS at once
    calls = []

    def generate(prompts):
        calls.append([p.tolist() for p in prompts])
        return [np.array(s) for s in sampled]

    micro = _gold_micro(student, teacher)
    out, stats = rollout_micro_batches(micro, generate, student_tokenizer=student, teacher_tokenizer=teacher,
                                       collator=Collator(student.pad_token_id or 0, teacher.pad_token_id or 0),
                                       whitespace="exact")
    prompts = [student(p)["input_ids"] for p in PROMPTS[:3]]
    assert calls == [prompts]  # one generation call per step, the repeat slot left out
    assert [b["student_input_ids"].shape[0] for b in out] == [2, 2]
    for batch in out:
        assert (batch["student_labels"] == -100).all() and (batch["teacher_labels"] == -100).all()
    rows = [(0, 0), (0, 1), (1, 0)]
    pairs = {}
    for (m, b), prompt, sample in zip(rows, prompts, sampled, strict=True):
        batch = out[m]
        length = int(batch["student_attention_mask"][b].sum())
        assert batch["student_input_ids"][b, :length].tolist() == prompt + sample
        keep = batch["align_batch"] == b
        s_pos, t_pos = batch["align_student"][keep].tolist(), batch["align_teacher"][keep].tolist()
        pairs[(m, b)] = (s_pos, t_pos)
        s_ids, t_ids = batch["student_input_ids"][b], batch["teacher_input_ids"][b]
        for s, t in zip(s_pos, t_pos, strict=True):  # every pair stands for the same bytes, or is EOS <-> EOS
            if int(s_ids[s]) == eos:
                assert int(t_ids[t]) == teacher.eos_token_id
            else:
                assert _token_bytes(student, int(s_ids[s])) == _token_bytes(teacher, int(t_ids[t]))
        assert all(s >= len(prompt) for s in s_pos)  # only sampled tokens are paired
    # Ended with EOS: EOS pairs with EOS (the last tokens on both sides).
    s_pos, t_pos = pairs[(0, 0)]
    assert s_pos[-1] == len(prompts[0]) + len(sampled[0]) - 1
    assert t_pos[-1] == int(out[0]["teacher_attention_mask"][0].sum()) - 1
    # No EOS sampled: no EOS on the teacher side either; paired tokens nonetheless.
    last_teacher = int(out[0]["teacher_input_ids"][1, int(out[0]["teacher_attention_mask"][1].sum()) - 1])
    assert pairs[(0, 1)][0] and last_teacher != teacher.eos_token_id
    assert pairs[(1, 0)] == ([], [])  # empty rollout: no pair
    if same_vocab:  # identity alignment over every sampled token, EOS included
        assert pairs[(0, 0)][0] == list(range(len(prompts[0]), len(prompts[0]) + len(sampled[0])))
        assert pairs[(0, 1)][0] == list(range(len(prompts[1]), len(prompts[1]) + len(sampled[1])))
    # The repeat slot keeps its gold tokens and contributes nothing.
    gold = _gold_micro(student, teacher)[1]
    length = int(gold["student_attention_mask"][1].sum())
    assert out[1]["student_input_ids"][1, :length].tolist() == gold["student_input_ids"][1, :length].tolist()
    assert not (out[1]["align_batch"] == 1).any() and int(out[1]["num_examples"]) == 1
    # Counts: no CE row anywhere; every pair is a KD row.
    kd = KDConfig(criterion="dskd" if same_vocab else "dskd_eta")
    total_pairs = sum(len(s) for s, _ in pairs.values())
    counts = [local_counts(kd, batch_rows(batch), batch) for batch in out]
    assert sum(int(c["ce"]) for c in counts) == 0
    assert sum(int(c["kd_t2s"]) for c in counts) == total_pairs > 0
    assert (stats.rollouts, stats.ended_with_eos, stats.empty) == (3, 2, 1)
    assert stats.generated_tokens == sum(len(s) for s in sampled) and stats.aligned_pairs == total_pairs
    metrics = rates(dict(zip(type(stats).names(), stats.values(), strict=True)))
    assert metrics["onpolicy/eos_rate"] == pytest.approx(2 / 3)
    assert metrics["onpolicy/alignment_coverage"] == pytest.approx(total_pairs / stats.generated_tokens)
    if same_vocab:  # every sampled token is paired but the lone EOS of the empty rollout
        assert metrics["onpolicy/alignment_coverage"] == pytest.approx(1 - 1 / stats.generated_tokens)


def test_teacher_rows_past_the_teacher_limit_are_cut_with_their_pairs(tokenizers):
    student, teacher = tokenizers["student"], tokenizers["teacher"]
    sample = student(" a long answer with many words in it", add_special_tokens=False)["input_ids"]
    micro = _gold_micro(student, teacher)[:1]
    collate = Collator(student.pad_token_id or 0, teacher.pad_token_id or 0)
    kwargs = {"student_tokenizer": student, "teacher_tokenizer": teacher, "collator": collate, "whitespace": "exact"}
    full, _ = rollout_micro_batches(micro, lambda p: [np.array(sample)] * len(p), **kwargs)
    limit = int(full[0]["teacher_attention_mask"][0].sum()) - 3
    cut, stats = rollout_micro_batches(micro, lambda p: [np.array(sample)] * len(p), teacher_max_length=limit,
                                       **kwargs)
    assert int(cut[0]["teacher_attention_mask"][0].sum()) == limit and stats.teacher_truncated == 1
    keep = full[0]["align_batch"] == 0
    expected = full[0]["align_teacher"][keep]
    assert cut[0]["align_teacher"][cut[0]["align_batch"] == 0].tolist() == expected[expected < limit].tolist()


def test_rollout_prompts_are_the_prealigned_prompts_truncated_as_prealignment_truncates(tokenizers, tmp_path):
    """A prompt longer than prealignment's max_length was cut from the left there; the rollout continues exactly
    that cut prompt (the student ids before the first label), so a rollout never exceeds max_length +
    max_new_tokens."""
    from dskd_scale.data.dataset import PrealignedDataset
    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign

    paths, student, teacher = tokenizers["paths"], tokenizers["student"], tokenizers["teacher"]
    max_length, new_tokens = 24, 5
    run_prealign(PrealignConfig(teacher_tokenizer=str(paths["teacher_tokenizer"]),
                                student_tokenizer=str(paths["student_tokenizer"]), data=(str(paths["train"]),),
                                out=str(tmp_path / "pre"), max_length=max_length))
    data = PrealignedDataset.open(tmp_path / "pre", expected_teacher_fingerprint=None,
                                  expected_student_fingerprint=None)
    examples = [data[i] for i in range(len(data))]
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    full_prompts = [student(row["prompt"])["input_ids"] for row in rows]
    assert any(len(p) >= max_length for p in full_prompts)  # some prompts had to be cut
    collate = Collator(student.pad_token_id or 0, teacher.pad_token_id or 0)
    micro = [collate(examples)]
    calls = []
    out, _ = rollout_micro_batches(micro, lambda p: calls.append(p) or [np.full(new_tokens, 5)] * len(p),
                                   student_tokenizer=student, teacher_tokenizer=teacher, collator=collate,
                                   whitespace="exact")
    prompts = calls[0]
    assert len(prompts) == len(examples)
    for example, prompt in zip(examples, prompts, strict=True):
        first_label = int(np.flatnonzero(example["student_labels"] != -100)[0])
        assert prompt.tolist() == example["student_input_ids"][:first_label].tolist()  # the shard's cut prompt
        assert prompt.size < max_length
    lengths = out[0]["student_attention_mask"].sum(1)
    assert int(lengths.max()) <= max_length + new_tokens
    assert lengths.tolist() == [p.size + new_tokens for p in prompts]


def test_a_step_without_prompts_still_calls_generation_once(tokenizers):
    """Generation is collective: a rank whose rows are all repeat slots joins it with no prompt."""
    student = tokenizers["student"]
    micro = _gold_micro(student, student)[1:]
    micro[0]["student_labels"][:] = -100  # both rows without labels
    calls = []
    out, stats = rollout_micro_batches(micro, lambda p: calls.append(p) or [], student_tokenizer=student,
                                       teacher_tokenizer=student, collator=Collator(0, 0), whitespace="exact")
    assert calls == [[]] and stats.rollouts == 0 and out[0]["align_batch"].numel() == 0


# ---------------------------------------------------------------- the loss of a step without gold labels


@pytest.mark.parametrize("eta", [False, True])
def test_loss_without_gold_labels_is_alpha_times_the_kd_means(eta):
    """All labels -100 (an on-policy step): the CE term has no row anywhere, so its global count is 0; the loss
    is finite and equals alpha * (KD_t2s + CE_t2s + KD_s2t) over the aligned rows, computed from the equations."""
    from test_criteria import ALPHA, TAU, World

    world = World(eta=eta)
    kd = KDConfig(criterion="dskd_eta" if eta else "dskd", alpha=ALPHA, temperature=TAU, chunk_size=4)
    ids = [0, 1, 2]
    batch, student_hidden, teacher_hidden = world.batch(ids)
    batch["student_labels"][:] = -100
    rows = batch_rows(batch)
    counts = {name: float(value) for name, value in local_counts(kd, rows, batch).items()}
    assert counts["ce"] == 0 and counts["kd_t2s"] > 0
    terms = compute_terms(kd, rows, student_hidden, teacher_hidden, world.engines(), agreement_mask=False, batch=batch)
    assert float(terms["ce"][1]) == 0 and float(terms["ce"][0].detach()) == 0
    loss, metrics = combine(kd, terms, counts, world_size=1, grad_accum_steps=1, agreement_mask=False)
    pieces = world.pieces(ids)
    expected = ALPHA * (pieces["kd_t2s_rows"].sum() + pieces["ce_t2s_rows"].sum()
                        + pieces["kd_s2t_rows"].sum()) / pieces["has_label"].numel()
    assert torch.isfinite(loss)
    # fp32 reductions over at most ~100 values of magnitude ~10 (the losses tests' own bound, see tolerance.py)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    assert float(metrics["ce"]) == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in world.params() if p.grad is not None)


@pytest.mark.parametrize("eta", [False, True])
def test_a_step_of_empty_rollouts_has_a_finite_zero_loss(eta):
    from test_criteria import ALPHA, TAU, World

    world = World(eta=eta)
    kd = KDConfig(criterion="dskd_eta" if eta else "dskd", alpha=ALPHA, temperature=TAU, chunk_size=4)
    batch, student_hidden, teacher_hidden = world.batch([0, 1])
    batch["student_labels"][:] = -100
    for key in ("align_batch", "align_student", "align_teacher"):
        batch[key] = batch[key][:0]
    rows = batch_rows(batch)
    counts = {name: float(value) for name, value in local_counts(kd, rows, batch).items()}
    assert counts["ce"] == 0 and counts["kd_t2s"] == 0
    terms = compute_terms(kd, rows, student_hidden, teacher_hidden, world.engines(), agreement_mask=False, batch=batch)
    loss, _ = combine(kd, terms, counts, world_size=2, grad_accum_steps=2, agreement_mask=False)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
