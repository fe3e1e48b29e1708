"""MinED: minimum-edit-distance vocabulary mapping and DTW token alignment (offline; pure NumPy/Python).

MinED (FuseLLM's vocabulary alignment, the DSKD papers' cross-tokenizer baseline) maps every teacher token to the
student token whose string is closest in edit distance, and aligns two tokenisations of the same text by dynamic
time warping (DTW) with an edit-distance cost. Both run offline: the map once per tokenizer pair
(`tools/build_mined_map.py`), the alignment once per example in the data pipeline.

Layout (one file, past the usual 400 lines, because MinED is one owned unit): vectorised edit distances; the
vocabulary map and its file; the DTW alignment.

Assumptions:
- Token strings are compared as the raw bytes they stand for ("normalised token strings", from
  `dskd_scale.alignment.token_bytes`, shared with ETA): 'Ġthe' and '▁the' are both b" the" (distance 0), and a
  newline is b"\\n" on both sides, unlike the anchor's surface-string compare ('Ċ' never met '<0x0A>').
- Special tokens (EOS, BOS, chat markers) have no bytes (None). In the map they pair as in the ETA vocabulary map
  (by role, then by content) or map to -1; in DTW they are one shared symbol outside the byte alphabet.
- Distance is Levenshtein over bytes (insert, delete, substitute: cost 1). Ties prefer ordinary pieces over
  SentencePiece byte-fallback tokens, then the smallest id, so the map is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SPECIAL_CODE = 256  # one symbol for every special token in DTW costs; never equal to a byte
_PAD_CODE = 257  # fills ragged code arrays; never compared (lengths are masked)
_ALPHABET = 258
MAX_INDEXED_LENGTH = 24  # longer student tokens skip the deletion index and are scanned directly
UNMAPPED = -1


def _codes(strings: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Pack byte strings into a padded uint16 array [N, L] (None -> the special symbol) and their lengths [N]."""
    lengths = np.array([1 if s is None else len(s) for s in strings], dtype=np.int64)
    codes = np.full((len(strings), max(1, int(lengths.max(initial=1)))), _PAD_CODE, dtype=np.uint16)
    for row, s in enumerate(strings):
        if s is None:
            codes[row, 0] = SPECIAL_CODE
        elif s:
            codes[row, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return codes, lengths


def _query_codes(query: bytes | None) -> np.ndarray:
    return np.array([SPECIAL_CODE], dtype=np.int64) if query is None else np.frombuffer(query, dtype=np.uint8)


def distances_to_many(query: bytes | None, codes_NL: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
    """Levenshtein distance from `query` to N strings given as padded codes (see `_codes`): int64 [N]."""
    n = codes_NL.shape[0]
    return _pair_distances([_query_codes(query)], np.zeros(n, dtype=np.int64), codes_NL, lengths_N)


def _pair_distances(
    queries: Sequence[np.ndarray], pair_query_P: np.ndarray, codes_PL: np.ndarray, lengths_P: np.ndarray
) -> np.ndarray:
    """Levenshtein distance of P (query, candidate) pairs; `queries[pair_query_P[p]]` against candidate row p.

    Vectorised over pairs: Hyyrö's bit-parallel algorithm (one 64-bit word per pair, one step per candidate symbol)
    for queries up to 64 symbols, a plain dynamic programme for longer ones. Returns int64 [P].
    """
    out = np.zeros(len(pair_query_P), dtype=np.int64)
    if not len(pair_query_P):
        return out
    qlen = np.array([len(q) for q in queries], dtype=np.int64)
    long_queries = np.flatnonzero(qlen > 64)
    for q in long_queries:
        rows = np.flatnonzero(pair_query_P == q)
        short = lengths_P[rows] <= 64
        if short.any():  # distance is symmetric: let each short candidate be the 64-bit pattern instead
            swapped = rows[short]
            patterns = [codes_PL[r, : lengths_P[r]] for r in swapped]
            text = np.broadcast_to(queries[q].astype(np.uint16), (len(swapped), len(queries[q])))
            out[swapped] = _pair_distances(
                patterns, np.arange(len(swapped)), text, np.full(len(swapped), len(queries[q]))
            )
        if (~short).any():
            out[rows[~short]] = _distances_dp(queries[q], codes_PL[rows[~short]], lengths_P[rows[~short]])
    rows = np.flatnonzero(qlen[pair_query_P] <= 64) if len(long_queries) else np.arange(len(pair_query_P))
    if not len(rows):
        return out
    peq = np.zeros((len(queries), _ALPHABET), dtype=np.uint64)
    for q, codes in enumerate(queries):
        if len(codes) <= 64:
            for i, code in enumerate(codes):
                peq[q, code] |= np.uint64(1 << i)
    # Longest candidates first: the pairs still consuming symbols at step j are then a prefix, so each step works
    # on a shrinking slice instead of masking every pair.
    rows = rows[np.argsort(-lengths_P[rows], kind="stable")]
    pq = pair_query_P[rows]
    codes = codes_PL[rows]
    lengths = lengths_P[rows]
    m = qlen[pq]
    one = np.uint64(1)
    full = np.where(m >= 64, np.uint64(0xFFFFFFFFFFFFFFFF), (one << np.minimum(m, 63).astype(np.uint64)) - one)
    top = np.maximum(m - 1, 0).astype(np.uint64)
    pv = full.copy()
    mv = np.zeros(len(rows), dtype=np.uint64)
    score = m.copy()
    active_counts = np.searchsorted(-lengths, -np.arange(int(lengths.max(initial=0))), side="left")
    for j, n in enumerate(active_counts):
        eq = peq[pq[:n], codes[:n, j]]
        f, t, p, v = full[:n], top[:n], pv[:n], mv[:n]
        xv = eq | v
        xh = ((((eq & p) + p) & f) ^ p) | eq
        ph = v | (~(xh | p) & f)
        mh = p & xh
        score[:n] += ((ph >> t) & one).astype(np.int64) - ((mh >> t) & one).astype(np.int64)
        ph = ((ph << one) | one) & f  # global distance: the top row grows by one per candidate symbol
        mh = (mh << one) & f
        pv[:n] = mh | (~(xv | ph) & f)
        mv[:n] = ph & xv
    empty = m == 0  # an empty query is `length` insertions away; the bit-parallel state has no bits for it
    out[rows] = np.where(empty, lengths, score)
    return out


def _distances_dp(q: np.ndarray, codes_NL: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
    """Reference dynamic programme, vectorised over candidates (used for queries longer than 64 symbols)."""
    n, width = len(codes_NL), int(lengths_N.max(initial=0))
    prev = np.broadcast_to(np.arange(width + 1, dtype=np.int64), (n, width + 1)).copy()
    for i, code in enumerate(q, start=1):
        curr = np.empty_like(prev)
        curr[:, 0] = i
        mismatch = (codes_NL != code).astype(np.int64)
        for j in range(1, width + 1):
            curr[:, j] = np.minimum(np.minimum(prev[:, j], curr[:, j - 1]) + 1, prev[:, j - 1] + mismatch[:, j - 1])
        prev = curr
    return prev[np.arange(n), lengths_N]


def edit_distance(a: bytes | None, b: bytes | None) -> int:
    """Levenshtein distance between two byte strings (None = the special-token symbol)."""
    codes, lengths = _codes([b])
    return int(distances_to_many(a, codes, lengths)[0])


def _deletions(s: bytes, depth: int) -> set[bytes]:
    """Every string obtained from `s` by deleting at most `depth` bytes (including `s` itself)."""
    out = {s}
    frontier = {s}
    for _ in range(depth):
        frontier = {t[:i] + t[i + 1 :] for t in frontier for i in range(len(t))}
        out |= frontier
    return out


class _StudentTable:
    """Student byte strings packed for batched distance queries, with byte counts for a cheap lower bound."""

    def __init__(self, ids: np.ndarray, strings: Sequence[bytes]) -> None:
        self.ids = ids
        self.codes, self.lengths = _codes(strings)
        self.lengths16 = self.lengths.astype(np.int16)
        # counts_BN[c, n]: how often byte c occurs in string n (byte-major so one byte's column is contiguous)
        self.counts_BN = np.zeros((256, len(strings)), dtype=np.int16)
        valid = np.arange(self.codes.shape[1])[None, :] < self.lengths[:, None]
        rows = np.broadcast_to(np.arange(len(strings))[:, None], self.codes.shape)
        np.add.at(self.counts_BN, (self.codes[valid], rows[valid]), 1)

    def lower_bound(self, query: bytes) -> np.ndarray:
        """int16 [N] lower bound on the edit distance: the bytes one side has in excess of the other."""
        values, counts = np.unique(np.frombuffer(query, dtype=np.uint8), return_counts=True)
        common = np.zeros(len(self.ids), dtype=np.int16)
        for value, count in zip(values, counts, strict=True):
            common += np.minimum(self.counts_BN[value], np.int16(count))
        return np.maximum(np.int16(len(query)) - common, self.lengths16 - common)

    def nearest(
        self,
        queries: Sequence[bytes],
        bests: Sequence[tuple[int, int] | None],
        *,
        chunk: int = 128,
        max_pairs: int = 1 << 21,
    ) -> list[tuple[int, int]]:
        """Exact (distance, id) of the nearest string for each query, ties to the smaller id.

        `bests[k]` is a known (distance, id) upper bound for query k or None. Only strings whose lower bound is
        within the current limit are checked; when none of them reaches the limit, the limit rises to the smallest
        distance seen and the query goes round again. Queries go `chunk` at a time (bounding memory), their pairs
        batched into vectorised calls of about `max_pairs`.
        """
        results: list[tuple[int, int]] = []
        for start in range(0, len(queries), chunk):
            part = range(start, min(start + chunk, len(queries)))
            bounds = {k: self.lower_bound(queries[k]) for k in part}
            limits = {k: int(bounds[k].min()) if bests[k] is None else bests[k][0] for k in part}
            found: dict[int, tuple[int, int]] = {}
            while limits:
                batch, pairs = [], 0
                for k in limits:
                    rows = np.flatnonzero(bounds[k] <= limits[k])
                    if batch and pairs + len(rows) > max_pairs:
                        break
                    batch.append((k, rows))
                    pairs += len(rows)
                pq = np.concatenate([np.full(len(rows), slot, np.int64) for slot, (_, rows) in enumerate(batch)])
                pr = np.concatenate([rows for _, rows in batch])
                codes = [_query_codes(queries[k]) for k, _ in batch]
                dist = _pair_distances(codes, pq, self.codes[pr], self.lengths[pr])
                ends = np.cumsum([len(rows) for _, rows in batch])
                for slot, (k, rows) in enumerate(batch):
                    d = dist[ends[slot] - len(rows) : ends[slot]]
                    low = int(d.min()) if len(d) else None
                    if low is not None and low <= limits[k]:  # every string within the limit was checked: exact
                        found[k] = (low, int(self.ids[rows[d == low]].min()))
                        del limits[k]
                    else:
                        limits[k] = low if low is not None else int(bounds[k][bounds[k] > limits[k]].min())
            results.extend(found[k] for k in part)
        return results


def build_vocabulary_map(
    teacher_bytes: Sequence[bytes | None],
    student_bytes: Sequence[bytes | None],
    *,
    fixed_pairs: Mapping[int, int] | None = None,
    student_rank: np.ndarray | None = None,
    index_depth: int = 2,
    batch_queries: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Map every teacher token to the student token nearest in byte edit distance.

    Exact for every token: equal strings through a dictionary; distances up to `index_depth` through a
    deletion-variant index (a substitution is one deletion on each side, so every string within that distance
    shares a variant), checked in batches with the vectorised distance; the rest by a scan pruned with a byte-count
    lower bound. `index_depth` and `batch_queries` are speed knobs and never change the result.

    Args:
        teacher_bytes: [W] byte string per teacher id (None: special token, mapped only through `fixed_pairs`).
        student_bytes: [V] byte string per student id (None: special token, never a candidate).
        fixed_pairs: teacher id -> student id overrides (special tokens paired by role); distance 0.
        student_rank: [V] tie-break key, smaller preferred (default: the id). Used to prefer ordinary pieces
            over SentencePiece byte-fallback tokens standing for the same bytes.

    Returns:
        `(teacher_to_student, distance)`: int64 [W] student id (-1 where the teacher token is special and has no
        role partner) and int32 [W] edit distance (-1 where unmapped). Ties go to the smallest rank, then id.
    """
    fixed_pairs = dict(fixed_pairs or {})
    # Work on "rank ids" (position in preference order), so "smallest id" below means "preferred student token".
    preferred = np.argsort(np.arange(len(student_bytes)) if student_rank is None else student_rank, kind="stable")
    candidates = [(rank, student_bytes[i]) for rank, i in enumerate(preferred.tolist()) if student_bytes[i] is not None]
    if not candidates:
        raise ValueError("the student vocabulary has no byte tokens to map onto")
    student_bytes = [student_bytes[i] for i in preferred.tolist()]
    exact: dict[bytes, int] = {}
    index: dict[bytes, list[int]] = {}
    unindexed: list[int] = []  # long strings: too many variants, every query checks them directly
    for student_id, s in candidates:
        exact.setdefault(s, student_id)
        if len(s) > MAX_INDEXED_LENGTH:
            unindexed.append(student_id)
        else:
            for variant in _deletions(s, index_depth):
                index.setdefault(variant, []).append(student_id)
    student_codes, student_lengths = _codes([s if s is not None else b"" for s in student_bytes])
    table = _StudentTable(np.array([i for i, _ in candidates], dtype=np.int64), [s for _, s in candidates])

    size = len(teacher_bytes)
    teacher_to_student = np.full(size, UNMAPPED, dtype=np.int64)
    distance = np.full(size, UNMAPPED, dtype=np.int32)
    pending: list[int] = []
    for teacher_id, query in enumerate(teacher_bytes):
        if teacher_id in fixed_pairs:
            teacher_to_student[teacher_id], distance[teacher_id] = fixed_pairs[teacher_id], 0
        elif query is not None and query in exact:
            teacher_to_student[teacher_id], distance[teacher_id] = exact[query], 0
        elif query is not None:
            pending.append(teacher_id)

    unindexed_ids = np.array(unindexed, dtype=np.int64)
    far: list[tuple[int, tuple[int, int] | None]] = []  # beyond the index: (teacher id, best found so far)
    for start in range(0, len(pending), batch_queries):
        batch = pending[start : start + batch_queries]
        pair_query, pair_student = [], []
        for slot, teacher_id in enumerate(batch):
            query = teacher_bytes[teacher_id]
            found: set[int] = set()
            for variant in _deletions(query, index_depth):
                found.update(index.get(variant, ()))
            ids = np.fromiter(found, dtype=np.int64, count=len(found))
            if len(query) + index_depth > MAX_INDEXED_LENGTH:
                ids = np.concatenate([ids, unindexed_ids])
            pair_query.append(np.full(len(ids), slot, dtype=np.int64))
            pair_student.append(ids)
        pq, ps = np.concatenate(pair_query), np.concatenate(pair_student)
        dist = _pair_distances(
            [_query_codes(teacher_bytes[t]) for t in batch], pq, student_codes[ps], student_lengths[ps]
        )
        order = np.lexsort((ps, dist, pq))  # per query: smallest distance, then smallest id
        first = np.ones(len(order), dtype=bool)
        first[1:] = pq[order][1:] != pq[order][:-1]
        best: dict[int, tuple[int, int]] = {int(pq[k]): (int(dist[k]), int(ps[k])) for k in order[first]}
        for slot, teacher_id in enumerate(batch):
            found_best = best.get(slot)
            if found_best is None or found_best[0] > index_depth:
                far.append((teacher_id, found_best))
            else:
                distance[teacher_id], teacher_to_student[teacher_id] = found_best
    if far:
        nearest = table.nearest([teacher_bytes[t] for t, _ in far], [b for _, b in far])
        for (teacher_id, _), (dist_value, student_id) in zip(far, nearest, strict=True):
            distance[teacher_id], teacher_to_student[teacher_id] = dist_value, student_id
    by_bytes = teacher_to_student >= 0
    by_bytes[list(fixed_pairs)] = False
    teacher_to_student[by_bytes] = preferred[teacher_to_student[by_bytes]]  # rank ids back to student ids
    return teacher_to_student, distance


@dataclass(frozen=True, eq=False)
class MinedMap:
    """The MinED vocabulary map of one tokenizer pair (what `tools/build_mined_map.py` writes).

    - `teacher_to_student` int64 [len(teacher_tokenizer)]: nearest student id, -1 for unpaired special tokens.
    - `teacher_distance` int32 [len(teacher_tokenizer)]: its byte edit distance, -1 where unmapped.
    - `student_to_teacher` int64 [len(student_tokenizer)]: `invert_map` of the above, -1 where none maps.
    - `teacher_token_bytes`, `student_token_bytes`: per-id bytes (None for special tokens), for DTW.
    """

    teacher_to_student: np.ndarray
    teacher_distance: np.ndarray
    student_to_teacher: np.ndarray
    teacher_token_bytes: list[bytes | None]
    student_token_bytes: list[bytes | None]


def build_mined_map(teacher_tokenizer: Any, student_tokenizer: Any) -> MinedMap:
    """MinED map of two HF fast tokenizers (duck-typed). Special tokens pair as in the ETA vocabulary map."""
    from dskd_scale.alignment.token_bytes import token_table
    from dskd_scale.alignment.vocab_map import build_vocab_map

    teacher = token_table(teacher_tokenizer, "teacher tokenizer")
    student = token_table(student_tokenizer, "student tokenizer")
    exact = build_vocab_map(teacher_tokenizer, student_tokenizer)
    fixed = {t: int(exact.teacher_to_student[t]) for t in teacher.special_ids if exact.teacher_to_student[t] >= 0}
    rank = student.byte_fallback.astype(np.int64) * student.vocab_size + np.arange(student.vocab_size)
    teacher_to_student, distance = build_vocabulary_map(
        teacher.token_bytes, student.token_bytes, fixed_pairs=fixed, student_rank=rank
    )
    return MinedMap(
        teacher_to_student=teacher_to_student,
        teacher_distance=distance,
        student_to_teacher=invert_map(teacher_to_student, distance, student.vocab_size),
        teacher_token_bytes=list(teacher.token_bytes),
        student_token_bytes=list(student.token_bytes),
    )


MINED_MAP_FORMAT = "dskd_scale.mined_map"
MINED_MAP_VERSION = 1


def _pack_bytes(table: Sequence[bytes | None]) -> dict[str, np.ndarray]:
    lengths = np.array([-1 if b is None else len(b) for b in table], dtype=np.int64)
    flat = np.frombuffer(b"".join(b for b in table if b is not None), dtype=np.uint8).copy()
    return {"lengths": lengths, "flat": flat}


def _unpack_bytes(lengths: np.ndarray, flat: np.ndarray) -> list[bytes | None]:
    raw = flat.tobytes()
    ends = np.cumsum(np.maximum(lengths, 0))
    return [None if n < 0 else raw[e - n : e] for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)]


def save_mined_map(path: str, mined: MinedMap, metadata: Mapping[str, str]) -> None:
    """Write the map and both byte tables to one safetensors file (`metadata`: tokenizer names, fingerprints)."""
    from safetensors.numpy import save_file

    tensors = {
        "teacher_to_student": mined.teacher_to_student,
        "teacher_distance": mined.teacher_distance,
        "student_to_teacher": mined.student_to_teacher,
    }
    for side, table in (("teacher", mined.teacher_token_bytes), ("student", mined.student_token_bytes)):
        packed = _pack_bytes(table)
        tensors[f"{side}_token_byte_lengths"] = packed["lengths"]
        tensors[f"{side}_token_bytes_flat"] = packed["flat"]
    meta = {"format": MINED_MAP_FORMAT, "format_version": str(MINED_MAP_VERSION), **metadata}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=meta)


def load_mined_map(path: str) -> tuple[MinedMap, dict[str, str]]:
    """Read a `save_mined_map` file; errors name the file and what is wrong with it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors' own SafetensorError derives from Exception only
        raise ValueError(
            f"{path}: cannot read a MinED map ({error}); build one with tools/build_mined_map.py"
        ) from error
    if metadata.get("format") != MINED_MAP_FORMAT:
        raise ValueError(f"{path}: not a MinED map (format {metadata.get('format')!r}, want {MINED_MAP_FORMAT!r})")
    if metadata.get("format_version") != str(MINED_MAP_VERSION):
        raise ValueError(
            f"{path}: MinED map version {metadata.get('format_version')}, this code reads {MINED_MAP_VERSION}"
        )
    mined = MinedMap(
        teacher_to_student=arrays["teacher_to_student"],
        teacher_distance=arrays["teacher_distance"],
        student_to_teacher=arrays["student_to_teacher"],
        teacher_token_bytes=_unpack_bytes(arrays["teacher_token_byte_lengths"], arrays["teacher_token_bytes_flat"]),
        student_token_bytes=_unpack_bytes(arrays["student_token_byte_lengths"], arrays["student_token_bytes_flat"]),
    )
    return mined, metadata


def invert_map(teacher_to_student: np.ndarray, distance: np.ndarray, student_size: int) -> np.ndarray:
    """Student id -> the teacher id mapped onto it with the smallest distance (ties: smallest teacher id), or -1.

    Returns int64 [student_size]. MinED moves teacher logits into the student vocabulary through this table.
    """
    out = np.full(student_size, UNMAPPED, dtype=np.int64)
    valid = np.flatnonzero(teacher_to_student >= 0)
    order = np.lexsort((valid, distance[valid], teacher_to_student[valid]))  # by student id, distance, teacher id
    ranked = valid[order]
    targets = teacher_to_student[ranked]
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = targets[1:] != targets[:-1]
    out[targets[first]] = ranked[first]
    return out


def pairwise_distances(a: Sequence[bytes | None], b: Sequence[bytes | None]) -> np.ndarray:
    """Edit-distance matrix int64 [len(a), len(b)], computed once per distinct string of `a`."""
    out = np.zeros((len(a), len(b)), dtype=np.int64)
    if not len(a) or not len(b):
        return out
    codes, lengths = _codes(b)
    rows_of: dict[bytes | None, list[int]] = {}
    for row, s in enumerate(a):
        rows_of.setdefault(s, []).append(row)
    for s, rows in rows_of.items():
        out[rows] = distances_to_many(s, codes, lengths)
    return out


def dtw_align(teacher_tokens: Sequence[bytes | None], student_tokens: Sequence[bytes | None]) -> np.ndarray:
    """DTW alignment of two token sequences with an edit-distance cost (the MinED sequence alignment).

    Classic DTW (steps diagonal, teacher-only, student-only) from (0, 0) to (n-1, m-1); the backtrace prefers the
    diagonal, then the teacher step, as FuseLLM/DSKD do. Returns, for every student index, the teacher index it is
    matched to when that match is one-to-one on the student side (the student token is paired with exactly one
    teacher token), else -1: int64 [len(student_tokens)].
    """
    n, m = len(teacher_tokens), len(student_tokens)
    matched = np.full(m, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return matched
    cost = pairwise_distances(teacher_tokens, student_tokens).astype(np.float64)
    acc = np.empty((n, m), dtype=np.float64)
    acc[0] = np.cumsum(cost[0])
    for i in range(1, n):
        # acc[i, j] = cost[i, j] + min(acc[i-1, j], acc[i-1, j-1], acc[i, j-1]); the left term is a running
        # min-plus scan, vectorised through cumulative sums.
        from_above = acc[i - 1].copy()
        from_above[1:] = np.minimum(from_above[1:], acc[i - 1, :-1])
        through = from_above + cost[i]
        prefix = np.cumsum(cost[i])
        acc[i] = prefix + np.minimum.accumulate(through - prefix)
    teacher_of: list[list[int]] = [[] for _ in range(m)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        teacher_of[j].append(i)
        diag = acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = acc[i - 1, j] if i > 0 else np.inf
        left = acc[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin((diag, up, left)))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    teacher_of[0].append(0)
    for student_index, teachers in enumerate(teacher_of):
        if len(teachers) == 1:
            matched[student_index] = teachers[0]
    return matched


def mined_alignment(
    student_input_ids: Sequence[int],
    student_labels: Sequence[int],
    teacher_input_ids: Sequence[int],
    teacher_labels: Sequence[int],
    *,
    student_vocab_bytes: Sequence[bytes | None],
    teacher_vocab_bytes: Sequence[bytes | None],
    teacher_to_student: np.ndarray,
    ignore_index: int = -100,
) -> tuple[np.ndarray, np.ndarray]:
    """MinED pairs for one example, in the shard convention of `align_student` / `align_teacher`.

    DTW runs over the response tokens (labels != ignore_index, not shifted: docs/design.md Contract 1) of both
    sides. A student response token is paired with its DTW partner when the match is one-to-one on the student
    side *and* the vocabulary map agrees (`teacher_to_student[teacher token] == student token`), as in DSKD's
    MinED criterion; every other student response token is left to the one-hot gold target in the loss.

    Note: DSKD aligns the *input* token of each predicting position; this aligns the *predicted* tokens, the same
    convention as ETA, so the engine gathers rows `s - 1` / `t - 1` for both.

    Returns:
        `(align_student, align_teacher)`: int64 [P] positions into the input ids (>= 1); `align_student` strictly
        increasing, `align_teacher` non-decreasing: two student tokens may share one teacher token (e.g. "\\n" "\\n"
        against "\\n\\n" when the map sends "\\n\\n" to "\\n"), as in DSKD's MinED. Unlike ETA pairs.
    """
    student_ids = np.asarray(student_input_ids, dtype=np.int64)
    teacher_ids = np.asarray(teacher_input_ids, dtype=np.int64)
    # A label at position 0 has no predicting position; prealignment writes such rows on purpose (a response too
    # long for max_length keeps no prompt), and no loss reads that label, so it takes no part in the alignment.
    student_pos = np.flatnonzero(np.asarray(student_labels) != ignore_index)
    teacher_pos = np.flatnonzero(np.asarray(teacher_labels) != ignore_index)
    student_pos, teacher_pos = student_pos[student_pos >= 1], teacher_pos[teacher_pos >= 1]
    matched = dtw_align(
        [teacher_vocab_bytes[t] for t in teacher_ids[teacher_pos]],
        [student_vocab_bytes[s] for s in student_ids[student_pos]],
    )
    keep = matched >= 0
    partner = teacher_ids[teacher_pos[np.where(keep, matched, 0)]]
    keep &= teacher_to_student[partner] == student_ids[student_pos]
    align_student = student_pos[keep]
    align_teacher = teacher_pos[matched[keep]]
    if np.any(np.diff(align_teacher) < 0):  # a DTW path is monotone
        raise AssertionError("DTW produced decreasing teacher positions")
    return align_student.astype(np.int64), align_teacher.astype(np.int64)
