"""Byte tables and the teacher <-> student vocabulary map on the real tokenizers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dskd_scale.alignment import build_vocab_map, token_bytes

pytestmark = pytest.mark.assets

NAMES = ("gpt2", "qwen1.5", "llama2", "mistral")


@pytest.fixture(scope="module")
def vocab_maps(tokenizers):
    return {(t, s): build_vocab_map(tokenizers[t], tokenizers[s]) for t, s in itertools.product(NAMES, NAMES)}


@pytest.mark.parametrize("name", NAMES)
def test_token_bytes_agree_with_the_rust_decoder(name, tokenizers):
    """Independent check of every decodable id: decode(['a' token, id]) == 'a' + token_bytes[id]."""
    tokenizer = tokenizers[name]
    table = token_bytes(tokenizer)
    assert len(table) == len(tokenizer)
    special = set(tokenizer.all_special_ids)
    assert all(table[i] is None for i in special)
    (anchor,) = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    anchor_text = tokenizer.backend_tokenizer.decode([anchor])
    ids, expected = [], []
    for token_id, raw in enumerate(table):
        if raw is None:
            assert token_id in special, f"id {token_id} has no bytes"
            continue
        try:
            expected.append(anchor_text + raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: the decoder prints U+FFFD for it
        ids.append(token_id)
    decoded = tokenizer.backend_tokenizer.decode_batch([[anchor, token_id] for token_id in ids])
    mismatched = [(i, e, d) for i, e, d in zip(ids, expected, decoded, strict=True) if e != d]
    assert not mismatched, mismatched[:5]
    assert len(ids) > 0.9 * len(tokenizer)


def test_byte_conventions_decode_to_raw_bytes(tokenizers):
    gpt2, llama = token_bytes(tokenizers["gpt2"]), token_bytes(tokenizers["llama2"])
    assert gpt2[220] == b" " and gpt2[198] == b"\n"  # 'Ġ', 'Ċ'
    assert llama[29871] == b" " and llama[13] == b"\n"  # '▁', '<0x0A>'
    assert llama[31937] == "Ġ".encode()  # Llama's literal U+0120 token is not a space
    assert llama[3 + 0xC3] == b"\xc3"  # '<0xC3>': a lone lead byte


@pytest.mark.parametrize("pair", list(itertools.product(NAMES, NAMES)), ids=lambda pair: f"{pair[0]}->{pair[1]}")
def test_map_is_injective_and_pairs_identical_bytes(pair, tokenizers, vocab_maps):
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    vocab_map = vocab_maps[pair]
    t2s, s2t = vocab_map.teacher_to_student, vocab_map.student_to_teacher
    assert t2s.dtype == s2t.dtype == np.int64 and t2s.shape == (len(teacher),) and s2t.shape == (len(student),)
    mapped_t = np.flatnonzero(t2s >= 0)
    mapped_s = np.flatnonzero(s2t >= 0)
    assert mapped_t.size == mapped_s.size == vocab_map.overlap_student_ids.size  # injective both ways
    np.testing.assert_array_equal(s2t[t2s[mapped_t]], mapped_t)
    np.testing.assert_array_equal(t2s[s2t[mapped_s]], mapped_s)
    np.testing.assert_array_equal(vocab_map.overlap_student_ids, mapped_s)  # sorted by student id
    np.testing.assert_array_equal(vocab_map.overlap_teacher_ids, s2t[mapped_s])
    assert vocab_map.overlap_teacher_ids.max() < len(teacher) and vocab_map.overlap_student_ids.max() < len(student)
    teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(student)
    for t, s in zip(mapped_t.tolist(), t2s[mapped_t].tolist(), strict=True):
        if teacher_bytes[t] is not None or student_bytes[s] is not None:
            assert teacher_bytes[t] == student_bytes[s], (t, s)
    # completeness: every teacher token whose bytes some student token has is mapped
    student_set = {raw for raw in student_bytes if raw is not None}
    missing = [t for t, raw in enumerate(teacher_bytes) if raw in student_set and t2s[t] < 0]
    fallback = [t for t in missing if teacher.convert_ids_to_tokens(t).startswith("<0x")]
    assert missing == fallback  # only byte-fallback duplicates of an ordinary piece stay unmapped


@pytest.mark.parametrize("name", NAMES)
def test_identical_tokenizers_map_to_the_identity(name, vocab_maps, tokenizers):
    identity = np.arange(len(tokenizers[name]))
    np.testing.assert_array_equal(vocab_maps[name, name].teacher_to_student, identity)
    np.testing.assert_array_equal(vocab_maps[name, name].overlap_teacher_ids, identity)


def test_special_tokens_map_by_role(vocab_maps, tokenizers):
    assert vocab_maps["qwen1.5", "llama2"].teacher_to_student[151643] == 2  # <|endoftext|> eos -> </s>
    assert vocab_maps["llama2", "qwen1.5"].teacher_to_student[2] == 151643
    assert vocab_maps["llama2", "qwen1.5"].teacher_to_student[1] == -1  # Qwen1.5 has no BOS
    assert vocab_maps["llama2", "mistral"].teacher_to_student[1] == 1
    assert vocab_maps["gpt2", "mistral"].teacher_to_student[50256] == 2
    assert vocab_maps["llama2", "gpt2"].teacher_to_student[0] == -1  # <unk> has no role counterpart
    assert vocab_maps["qwen1.5", "gpt2"].teacher_to_student[151644] == -1  # <|im_start|>
    assert vocab_maps["qwen1.5", "gpt2"].teacher_to_student[151643] == 50256


def test_unknown_strings_never_become_the_students_eos(vocab_maps, tokenizers):
    """convert_tokens_to_ids would give GPT-2's unk id (= EOS 50256) for Qwen tokens GPT-2 lacks."""
    qwen, gpt2 = tokenizers["qwen1.5"], tokenizers["gpt2"]
    chinese = qwen("中文", add_special_tokens=False)["input_ids"]
    assert len(chinese) == 1 and gpt2.convert_tokens_to_ids(qwen.convert_ids_to_tokens(chinese[0])) == 50256
    t2s = vocab_maps["qwen1.5", "gpt2"].teacher_to_student
    assert t2s[chinese[0]] == -1
    assert np.flatnonzero(t2s == 50256).tolist() == [151643]


def test_llama_literal_g_token_does_not_collide_with_its_space(vocab_maps):
    """String normalisation 'Ġ'->'▁' makes Llama's 31937 ('Ġ') and 29871 ('▁') collide; bytes do not."""
    to_gpt2 = vocab_maps["llama2", "gpt2"].teacher_to_student
    assert to_gpt2[29871] == 220  # '▁' -> 'Ġ' (a space)
    assert to_gpt2[31937] != 220
    from_gpt2 = vocab_maps["gpt2", "llama2"].teacher_to_student
    assert from_gpt2[220] == 29871


def test_padded_head_rows_are_excluded(vocab_maps, tokenizers):
    """Qwen1.5-1.8B's head has 151936 rows for a 151646-token tokenizer: maps and overlap stop at len()."""
    vocab_map = vocab_maps["qwen1.5", "gpt2"]
    assert vocab_map.teacher_to_student.shape == (151646,) == (len(tokenizers["qwen1.5"]),)
    assert vocab_map.overlap_teacher_ids.max() < 151646
    assert set(vocab_map.as_arrays()) == {
        "teacher_to_student",
        "student_to_teacher",
        "overlap_teacher_ids",
        "overlap_student_ids",
    }
