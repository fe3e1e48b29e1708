"""MinED vocabulary map and DTW alignment: exactness against brute-force references, real tokenizers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dskd_scale.alignment import mined


def reference_distance(a: bytes | None, b: bytes | None) -> int:
    """Textbook Levenshtein DP (independent of the vectorised code); None is one special symbol."""
    a_seq = [256] if a is None else list(a)
    b_seq = [256] if b is None else list(b)
    prev = list(range(len(b_seq) + 1))
    for i, x in enumerate(a_seq, start=1):
        curr = [i] + [0] * len(b_seq)
        for j, y in enumerate(b_seq, start=1):
            curr[j] = min(prev[j] + 1, curr[j - 1] + 1, prev[j - 1] + (x != y))
        prev = curr
    return prev[-1]


def random_strings(rng: random.Random, count: int, alphabet: bytes, max_len: int) -> list[bytes]:
    return [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


def test_distances_match_reference_including_long_and_special():
    rng = random.Random(0)
    candidates = random_strings(rng, 60, b"abc d", 9) + [b"x" * 70, None, b""]
    queries = random_strings(rng, 25, b"abc d", 9) + [b"ab" * 40, None, b"", b"a" * 64, b"b" * 65]
    codes, lengths = mined._codes(candidates)
    for query in queries:
        got = mined.distances_to_many(query, codes, lengths)
        assert got.tolist() == [reference_distance(query, c) for c in candidates], query


def brute_force_map(teacher, student, rank):
    out = []
    for query in teacher:
        if query is None:
            out.append((-1, -1))
            continue
        best = min((reference_distance(query, s), rank[i], i) for i, s in enumerate(student) if s is not None)
        out.append((best[2], best[0]))
    return out


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_vocabulary_map_is_the_exact_minimum_with_ties_by_rank(depth):
    rng = random.Random(1)
    student = random_strings(rng, 80, b"abcd ", 7) + [b"abcdabcdabcdabcdabcdabcdabcd", None]  # one unindexed
    student += [student[3]]  # a duplicate string: the preferred rank must win
    teacher = random_strings(rng, 120, b"abcde ", 8) + [b"abcdabcdabcdabcdabcdabcdabce", None, b""]
    rank = np.arange(len(student))
    rank[-1] = -1  # prefer the duplicate over its twin
    got_ids, got_dist = mined.build_vocabulary_map(
        teacher, student, student_rank=rank, index_depth=depth, batch_queries=7, fixed_pairs={len(teacher) - 2: 0}
    )
    expected = brute_force_map(teacher, student, rank)
    expected[len(teacher) - 2] = (0, 0)  # the fixed (special-role) pair
    assert list(zip(got_ids.tolist(), got_dist.tolist(), strict=True)) == expected


def test_invert_map_prefers_smallest_distance_then_id():
    teacher_to_student = np.array([2, 2, 0, -1, 2], dtype=np.int64)
    distance = np.array([3, 1, 0, -1, 1], dtype=np.int32)
    assert mined.invert_map(teacher_to_student, distance, 4).tolist() == [2, -1, 1, -1]


def reference_dtw_matches(teacher, student):
    """The FuseLLM/DSKD loop DTW (anchor min_edit_dis_kld.py), rewritten plainly: one-to-one student matches."""
    n, m = len(teacher), len(student)
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0
    for i in range(n):
        for j in range(m):
            acc[i + 1, j + 1] = reference_distance(teacher[i], student[j]) + min(
                acc[i, j + 1], acc[i + 1, j], acc[i, j]
            )
    acc = acc[1:, 1:]
    i, j = n - 1, m - 1
    teacher_of = [[] for _ in range(m)]
    while i > 0 or j > 0:
        teacher_of[j].append(i)
        options = [
            acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf,
            acc[i - 1, j] if i > 0 else np.inf,
            acc[i, j - 1] if j > 0 else np.inf,
        ]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    teacher_of[0].append(0)
    return [t[0] if len(t) == 1 else -1 for t in teacher_of]


def test_dtw_on_hand_written_tokens():
    # "c" and "d" (cost 1 each against "cd") both pair with "cd" only: one-to-one on the student side.
    assert mined.dtw_align([b"ab", b"cd", b"ef", None], [b"ab", b"c", b"d", b"ef", None]).tolist() == [0, 1, 1, 2, 3]
    # Mirror case: student "cd" spans teacher "c" and "d", so it has no one-to-one partner.
    assert mined.dtw_align([b"ab", b"c", b"d", b"ef", None], [b"ab", b"cd", b"ef", None]).tolist() == [0, -1, 3, 4]
    assert mined.dtw_align([], [b"a"]).tolist() == [-1]


def test_dtw_matches_the_loop_reference_on_random_sequences():
    rng = random.Random(2)
    for _ in range(15):
        teacher = random_strings(rng, rng.randint(1, 12), b"ab c", 4)
        student = random_strings(rng, rng.randint(1, 12), b"ab c", 4)
        assert mined.dtw_align(teacher, student).tolist() == reference_dtw_matches(teacher, student)


def test_mined_alignment_positions_and_vocabulary_check():
    # ids: student 0 BOS, 1 "Hi", 2 " th", 3 "ere", 4 "!", 5 EOS; teacher 0 "Hi", 1 " there", 2 "!", 3 EOS.
    student_vocab = [None, b"Hi", b" th", b"ere", b"!", None]
    teacher_vocab = [b"Hi", b" there", b"!", None]
    teacher_to_student = np.array([1, 2, 4, 5], dtype=np.int64)  # " there" -> " th"
    student_ids = [0, 1, 2, 3, 4, 5, 5]  # BOS, prompt "Hi", response " th" "ere" "!" EOS, padding
    student_labels = [-100, -100, 2, 3, 4, 5, -100]
    teacher_ids = [0, 1, 2, 3]
    teacher_labels = [-100, 1, 2, 3]
    s, t = mined.mined_alignment(
        student_ids,
        student_labels,
        teacher_ids,
        teacher_labels,
        student_vocab_bytes=student_vocab,
        teacher_vocab_bytes=teacher_vocab,
        teacher_to_student=teacher_to_student,
    )
    # " th" matches " there" one-to-one and the map agrees; "ere" also matches " there" but the map says " th".
    assert s.tolist() == [2, 4, 5] and t.tolist() == [1, 2, 3]
    # A response too long for max_length is prealigned without its prompt, so its first label sits at position 0,
    # where nothing predicts it: that label takes no part, the rest align as before (was a ValueError on real data).
    s, t = mined.mined_alignment(
        [2, 3, 4, 5],
        [2, 3, 4, 5],
        [1, 2, 3],
        [1, 2, 3],
        student_vocab_bytes=student_vocab,
        teacher_vocab_bytes=teacher_vocab,
        teacher_to_student=teacher_to_student,
    )
    # student " th"(0, no predictor) "ere"(1) "!"(2) EOS(3); teacher " there"(0, no predictor) "!"(1) EOS(2)
    assert s.tolist() == [2, 3] and t.tolist() == [1, 2]


def test_map_file_round_trip_and_bad_file(tmp_path):
    mapped = mined.MinedMap(
        teacher_to_student=np.array([1, -1]),
        teacher_distance=np.array([0, -1], np.int32),
        student_to_teacher=np.array([-1, 0]),
        teacher_token_bytes=[b"a", None],
        student_token_bytes=[None, b"a"],
    )
    path = str(tmp_path / "map.safetensors")
    mined.save_mined_map(path, mapped, {"teacher_tokenizer": "t"})
    loaded, metadata = mined.load_mined_map(path)
    assert metadata["teacher_tokenizer"] == "t" and metadata["format"] == mined.MINED_MAP_FORMAT
    assert loaded.teacher_token_bytes == [b"a", None] and loaded.student_token_bytes == [None, b"a"]
    assert loaded.teacher_to_student.tolist() == [1, -1]
    (tmp_path / "junk.safetensors").write_bytes(b"not a map")
    with pytest.raises(ValueError, match="junk.safetensors"):
        mined.load_mined_map(str(tmp_path / "junk.safetensors"))


@pytest.mark.assets
def test_real_gpt2_to_llama2_identical_bytes_map_to_themselves(asset):
    from transformers import AutoTokenizer

    from dskd_scale.alignment.token_bytes import token_table

    teacher = token_table(AutoTokenizer.from_pretrained(asset("tokenizers/gpt2")))
    student = token_table(AutoTokenizer.from_pretrained(asset("tokenizers/llama2")))
    rank = student.byte_fallback.astype(np.int64) * student.vocab_size + np.arange(student.vocab_size)
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(teacher.vocab_size - 1, size=200, replace=False))  # GPT-2 ids, no EOS
    queries = [teacher.token_bytes[i] for i in subset]
    ids, dist = mined.build_vocabulary_map(queries, student.token_bytes, student_rank=rank, index_depth=0)
    by_bytes = {}
    for student_id in np.argsort(rank, kind="stable").tolist():
        if student.token_bytes[student_id] is not None:
            by_bytes.setdefault(student.token_bytes[student_id], student_id)
    identical = [k for k, q in enumerate(queries) if q in by_bytes]
    assert len(identical) > 40  # about a third of GPT-2, e.g. b" the": 'Ġthe' (GPT-2) and '▁the' (Llama-2)
    for k in identical:
        assert dist[k] == 0 and ids[k] == by_bytes[queries[k]]
        assert not student.byte_fallback[ids[k]] or len(queries[k]) == 1
    for k in range(len(queries)):
        assert dist[k] == reference_distance(queries[k], student.token_bytes[ids[k]]) > 0 or k in identical
    # Deterministic and independent of query order and batching. Depth 0 skips the deletion index (a speed knob
    # whose exactness the synthetic test above checks) to keep this test cheap.
    again_ids, again_dist = mined.build_vocabulary_map(
        queries[::-1], student.token_bytes, student_rank=rank, index_depth=0, batch_queries=37
    )
    assert again_ids[::-1].tolist() == ids.tolist() and again_dist[::-1].tolist() == dist.tolist()


def test_mined_alignment_lets_two_student_tokens_share_a_teacher_token():
    # Regression (found on Dolly, GPT-2 -> Llama-2): "\n\n" maps to "\n", so both student "\n" pair with it.
    student_vocab, teacher_vocab = [None, b"\n", b"x"], [b"\n\n", b"x"]
    s, t = mined.mined_alignment(
        [0, 2, 1, 1, 2],
        [-100, -100, 1, 1, 2],
        [1, 0, 1],
        [-100, 0, 1],
        student_vocab_bytes=student_vocab,
        teacher_vocab_bytes=teacher_vocab,
        teacher_to_student=np.array([1, 2]),
    )
    assert s.tolist() == [2, 3, 4] and t.tolist() == [1, 1, 2]
