"""Online alignment of student rollouts equals the offline prealigner's alignment on the same text.

The rollouts are built from the offline rows themselves (the student's ids of a prealigned row are exactly what a
student could have sampled), then cut: without EOS (max_new_tokens reached), after every response token (many
cuts fall inside a multi-byte character: byte-level BPE pieces, '<0xNN>' byte fallback), and empty.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dskd_scale.alignment import token_bytes
from dskd_scale.alignment.online import align_rollouts, prompt_text
from dskd_scale.prealign.batch_rows import build_rows
from dskd_scale.prealign.rows import RowBuilder
from dskd_scale.utils.assets import asset_path, missing_asset_reason

pytestmark = pytest.mark.assets

PAIRS = [("gpt2", "llama2"), ("llama2", "gpt2"), ("qwen1.5", "mistral"), ("mistral", "qwen1.5"), ("llama2", "llama2")]
MULTIBYTE_RESPONSES = ["Sure 🙂 ok 中文 done", " 日本語のテキスト、한국어 👨‍👩‍👧‍👦 café", "x\n\n  🇫🇷 ½ naïve ∑"]


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, str]]:
    path = asset_path("data/dolly/valid.jsonl")
    if path is None:
        pytest.skip(missing_asset_reason("data/dolly/valid.jsonl"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:12]]
    dolly = [(row["prompt"], row["output"] if isinstance(row["output"], str) else row["output"][0]) for row in rows]
    return dolly + [("Question: say it\nAnswer:", response) for response in MULTIBYTE_RESPONSES]


def as_rollout(result, student):
    """(prompt text, student prompt ids, student response ids incl. EOS) of an offline row, the prompt text as a
    trainer gets it from the ids alone."""
    ids = result.student.ids
    first = int(np.argmax(result.student.response))
    text = prompt_text(student, ids[:first])
    assert text == result.text[: int(result.student.ends[:first].max(initial=0))]
    return text, ids[:first], ids[first:]


def pairs_of(align_student, align_teacher) -> list[tuple[int, int]]:
    return list(zip(np.asarray(align_student).tolist(), np.asarray(align_teacher).tolist(), strict=True))


@pytest.mark.parametrize("whitespace", ["exact", "paper"])
@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_online_pairs_equal_offline_pairs_with_and_without_eos(pair, whitespace, tokenizers, examples):
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    offline = build_rows(RowBuilder(teacher, student, max_length=4096, whitespace=whitespace), examples)
    assert not any(r.prompt_truncated or r.response_truncated for r in offline)
    rollouts = [as_rollout(r, student) for r in offline]
    prompts, prompt_ids, responses = (list(column) for column in zip(*rollouts, strict=True))
    online = align_rollouts(teacher, student, prompts, prompt_ids, responses, whitespace=whitespace)
    no_eos = align_rollouts(teacher, student, prompts, prompt_ids, [r[:-1] for r in responses], whitespace=whitespace)
    for row, with_eos, without_eos in zip(offline, online, no_eos, strict=True):
        expected = pairs_of(row.columns["align_student"], row.columns["align_teacher"])
        assert pairs_of(with_eos.align_student, with_eos.align_teacher) == expected and with_eos.text == row.text
        np.testing.assert_array_equal(with_eos.teacher_input_ids, row.columns["teacher_input_ids"])
        np.testing.assert_array_equal(with_eos.student_input_ids, row.columns["student_input_ids"])
        if row.student.straddles:  # the rollout's prompt ends where the student's straddling token ends
            assert np.all(row.teacher.response[with_eos.teacher_response])
        else:
            np.testing.assert_array_equal(with_eos.teacher_response, row.teacher.response)
        assert with_eos.ended_with_eos and with_eos.cut_tokens == 0 and not with_eos.empty
        # max_new_tokens reached: the same pairs without the EOS pair, and no teacher EOS
        assert pairs_of(without_eos.align_student, without_eos.align_teacher) == expected[:-1]
        np.testing.assert_array_equal(without_eos.teacher_input_ids, row.columns["teacher_input_ids"][:-1])
        assert not without_eos.ended_with_eos
    if pair[0] == pair[1]:  # same tokenizer: identity over the response tokens (EOS included)
        for row in online:
            response = np.flatnonzero(row.teacher_response)
            np.testing.assert_array_equal(row.align_student, response)
            np.testing.assert_array_equal(row.align_teacher, response)


@pytest.mark.parametrize("pair", [("llama2", "gpt2"), ("gpt2", "llama2"), ("qwen1.5", "llama2")], ids="->".join)
def test_rollouts_cut_after_every_token_are_sound_and_equal_offline_where_the_text_tokenises_the_same(
        pair, tokenizers, examples):
    """Each prefix of a sampled response, without EOS: no pair at or after the cut, every pair covers the same
    bytes, and where the student's whole tokens are what the student tokenizer gives for the cut text, the pairs
    are the offline prealigner's on that text (minus its EOS pair)."""
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    builder = RowBuilder(teacher, student, max_length=4096)
    raw_student, raw_teacher = token_bytes(student), token_bytes(teacher)
    prompt, prompt_ids, response = as_rollout(builder.build(*examples[-3]), student)
    for extra in MULTIBYTE_RESPONSES[1:]:
        response = np.concatenate([response[:-1], builder.build(prompt, extra).student.ids[len(prompt_ids):]])
    response = response[:-1]  # no EOS
    cuts = [response[:m] for m in range(response.size + 1)]
    online = align_rollouts(teacher, student, [prompt] * len(cuts), [prompt_ids] * len(cuts), cuts)
    compared = mid_character = 0
    for cut, row in zip(cuts, online, strict=True):
        whole = cut.size - row.cut_tokens
        mid_character += row.cut_tokens > 0
        assert row.empty == (row.text == prompt) and (not row.empty or row.align_student.size == 0)
        assert np.all(row.align_student < len(prompt_ids) + whole) and not row.ended_with_eos
        assert np.all(np.diff(row.align_student) > 0) and np.all(np.diff(row.align_teacher) > 0)
        # soundness from the token bytes alone: laid end to end, paired tokens start and end at the same byte
        ends_s = np.cumsum([len(raw_student[i] or b"") for i in row.student_input_ids.tolist()])
        ends_t = np.cumsum([len(raw_teacher[i] or b"") for i in row.teacher_input_ids.tolist()])
        num_bytes = len(row.text.encode("utf-8"))
        dummy_s = ends_s[len(prompt_ids) + whole - 1] - num_bytes  # a SentencePiece dummy prefix space, if any
        dummy_t = ends_t[-1] - num_bytes
        assert dummy_s in (0, 1) and dummy_t in (0, 1)
        for i, j in pairs_of(row.align_student, row.align_teacher):
            assert raw_student[row.student_input_ids[i]] == raw_teacher[row.teacher_input_ids[j]]
            assert ends_s[i] - dummy_s == ends_t[j] - dummy_t
        if row.empty:
            continue
        offline = builder.build(prompt, row.text[len(prompt):])
        if np.array_equal(offline.student.ids[:-1], row.student_input_ids[: len(prompt_ids) + whole]):
            expected = pairs_of(offline.columns["align_student"], offline.columns["align_teacher"])[:-1]
            assert pairs_of(row.align_student, row.align_teacher) == expected
            compared += 1
    assert mid_character >= 5 and compared >= response.size // 2, (mid_character, compared, response.size)


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5", "llama2", "mistral"])
def test_prompt_text_is_what_the_prompt_ids_spell(name, tokenizers, examples):
    tokenizer = tokenizers[name]
    for prompt in [p for p, _ in examples[:6]] + [" two  spaces first", "x . y , z"]:
        ids = tokenizer(prompt)["input_ids"]
        text = prompt_text(tokenizer, ids)
        # the prompt itself, or (Llama-2 encodes " two" and "two" alike) the prompt without its leading space
        assert text == prompt or (name == "llama2" and text == prompt[1:] and tokenizer(text)["input_ids"] == ids)


@pytest.mark.parametrize(("name", "ending"), [("gpt2", "中文"), ("llama2", "🙂")])
def test_same_tokenizer_pairs_every_sampled_token_even_after_a_cut(name, ending, tokenizers):
    tokenizer = tokenizers[name]
    prompt_ids = tokenizer("Say it:")["input_ids"]
    response = tokenizer(" ok " + ending, add_special_tokens=False)["input_ids"]
    cut = response[:-1]  # ends inside the last character ('æĸ' of 文 / a '<0xNN>' byte of the emoji)
    rows = align_rollouts(tokenizer, tokenizer, ["Say it:"] * 3, [prompt_ids] * 3,
                          [response + [tokenizer.eos_token_id], cut, []])
    for row, sampled in zip(rows, (response + [tokenizer.eos_token_id], cut, []), strict=True):
        expected = np.arange(len(prompt_ids), len(prompt_ids) + len(sampled))
        np.testing.assert_array_equal(row.align_student, expected)
        np.testing.assert_array_equal(row.align_teacher, expected)
        np.testing.assert_array_equal(row.teacher_input_ids, row.student_input_ids)
    assert rows[1].cut_tokens >= 1 and rows[1].text.rstrip(" 中") == "Say it: ok"


def test_empty_and_eos_only_generations_have_no_pairs(tokenizers):
    teacher, student = tokenizers["qwen1.5"], tokenizers["llama2"]
    prompt = "Say nothing:"
    prompt_ids = student(prompt)["input_ids"]
    rows = align_rollouts(teacher, student, [prompt] * 2, [prompt_ids] * 2, [[], [student.eos_token_id]])
    for row in rows:
        assert row.empty and row.align_student.size == row.align_teacher.size == 0
        assert row.text == prompt
    assert rows[1].ended_with_eos and rows[1].student_input_ids[-1] == student.eos_token_id


def test_mismatched_batch_and_bad_mode_are_refused(tokenizers):
    gpt2 = tokenizers["gpt2"]
    with pytest.raises(ValueError, match="2 prompts, 1 prompt id rows"):
        align_rollouts(gpt2, gpt2, ["a", "b"], [[1]], [[2], [3]])
    with pytest.raises(ValueError, match="row 1: the student prompt ids spell b'Hello', not the prompt text 'Bye'"):
        align_rollouts(gpt2, gpt2, ["Hello", "Bye"], [gpt2("Hello")["input_ids"]] * 2, [[2], [3]])
    with pytest.raises(ValueError, match="whitespace must be one of"):
        align_rollouts(gpt2, gpt2, ["a"], [[1]], [[2]], whitespace="loose")
