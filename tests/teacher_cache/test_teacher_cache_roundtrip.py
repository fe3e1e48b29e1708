"""Teacher cache round trip: the stored rows are the live teacher's final hidden states at the right positions,
within the storage dtype's rounding (both modes, bf16 and fp8), read per example and per collated batch; one
all_positions cache serves another student's prealigned folder; mismatched caches are refused naming the key.

Error bounds (derived here, from the formats):
- bf16 keeps 8 significant bits, so round-to-nearest changes a value x by at most 2^-8 |x|.
- fp8 e4m3fn keeps 4 significant bits for |v| >= 2^-6 (relative error <= 2^-4) and has subnormal spacing 2^-9
  below (absolute error <= 2^-10). The cache stores v = x / s with s = amax / 448 per row, so a decoded value is
  off by at most 2^-4 |x| + 2^-10 s, plus two fp32 roundings (the division and the decode product).
- The writer runs the teacher on padded batches, the reference on one unpadded example: the same maths summed in
  another order, bounded by chain * eps32 * scale (chain = the dot-product lengths one hidden value accumulates,
  Higham eq. 4.4), as in tests/engine/engine_helpers.logits_tolerance.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import write_cache

from dskd_scale.data.collate import Collator
from dskd_scale.data.dataset import PrealignedDataset
from dskd_scale.teacher_cache import (
    CacheMismatch,
    TeacherCache,
    data_fingerprint,
    teacher_fingerprint,
    text_fingerprint,
)
from dskd_scale.teacher_cache.format import decode_rows, encode_rows

EPS32 = torch.finfo(torch.float32).eps


# ---- codecs: golden values and the bounds --------------------------------------------------------------------


def test_bf16_codec_golden_values():
    rows = torch.tensor([[1.0 / 3.0, -2.0, 0.0, 1.0e-3]])
    stored, scales = encode_rows(rows, "bf16")
    assert scales is None and stored.dtype == np.uint16
    # 1/3 = 0x3EAAAAAB in fp32: the dropped half 0xAAAB > 0x8000 rounds the kept half 0x3EAA up to 0x3EAB.
    assert stored[0, 0] == 0x3EAB
    decoded = decode_rows(stored, None, "bf16")
    assert decoded[0, 0] == np.float32(0.333984375) and decoded[0, 1] == -2.0 and decoded[0, 2] == 0.0


def test_fp8_codec_golden_values():
    rows = torch.tensor([[448.0, 1.0, -0.5, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    stored, scales = encode_rows(rows, "fp8_e4m3")
    assert stored.dtype == np.uint8 and scales.dtype == np.float32
    assert scales.tolist() == [1.0, 1.0]  # amax / 448 = 1; an all-zero row gets scale 1
    decoded = decode_rows(stored, scales, "fp8_e4m3")
    # 0.1 = 1.6 * 2^-4; with 3 mantissa bits the neighbours are 1.5 and 1.625 * 2^-4, and 1.625 is nearer.
    assert decoded[0].tolist() == [448.0, 1.0, -0.5, 0.0, 0.1015625]
    assert decoded[1].tolist() == [0.0] * 5


def bf16_bound(x: np.ndarray) -> np.ndarray:
    return 2.0**-8 * np.abs(x)


def fp8_bound(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=-1, keepdims=True) / 448.0
    return 2.0**-4 * np.abs(x) + 2.0**-10 * scale + 4 * EPS32 * np.abs(x)


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_codec_error_within_the_derived_bound(dtype):
    generator = torch.Generator().manual_seed(0)
    # Values over many binades (and exact zeros), rows of very different scales.
    rows = torch.randn(64, 96, generator=generator) * torch.logspace(-6, 3, 64)[:, None]
    rows[::7, ::5] = 0.0
    stored, scales = encode_rows(rows, dtype)
    decoded = decode_rows(stored, scales, dtype).astype(np.float64)
    exact = rows.double().numpy()
    bound = bf16_bound(exact) if dtype == "bf16" else fp8_bound(exact)
    assert np.all(np.abs(decoded - exact) <= bound)
    # The bound is not loose by orders of magnitude: the worst relative error uses most of the format's step.
    normal = np.abs(exact) > 0.05 * np.abs(exact).max(axis=1, keepdims=True)
    worst = (np.abs(decoded - exact)[normal] / np.abs(exact)[normal]).max()
    assert worst > (2.0**-9 if dtype == "bf16" else 2.0**-5)


# ---- round trip against the live teacher --------------------------------------------------------------------


def live_hidden(teacher_dir: Path, input_ids: np.ndarray) -> tuple[np.ndarray, object]:
    """The teacher's final hidden states ``[L, E]`` (fp64 copy) for one unpadded example, through the plain HF
    model's ``output_hidden_states``; checks that this last entry is post-norm (the head applied to it gives the
    logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long)[None], output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        torch.testing.assert_close(model.lm_head(hidden), out.logits[0])
    return hidden.double().numpy(), model.config


def reorder_bound(config, hidden: np.ndarray) -> float:
    chain = config.num_hidden_layers * (3 * config.hidden_size + hidden.shape[0] + config.intermediate_size)
    return chain * EPS32 * max(float(np.abs(hidden).max()), 1.0)


def expected_positions(example: dict, mode: str) -> np.ndarray:
    if mode == "aligned":
        return example["align_teacher"].astype(np.int64) - 1
    response = np.flatnonzero(example["teacher_labels"] != -100)
    return np.arange(response[0] - 1, example["teacher_labels"].size - 1)


def open_cache(folder: Path, demo: dict, data: str = "eta", **kwargs) -> TeacherCache:
    return TeacherCache.open(folder, teacher_fingerprint=teacher_fingerprint(demo["teacher"]),
                             data_fingerprint=data_fingerprint(demo[data]), hidden_size=48, **kwargs)


@pytest.fixture(scope="module")
def caches(cache_demo, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("caches")
    folders = {}
    for mode in ("aligned", "all_positions"):
        for dtype in ("bf16", "fp8_e4m3"):
            folders[mode, dtype] = root / f"{mode}_{dtype}"
            write_cache(cache_demo, folders[mode, dtype], mode=mode, dtype=dtype)
    return folders


@pytest.mark.parametrize("mode", ["aligned", "all_positions"])
@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_cached_rows_equal_live_teacher_hidden_states(cache_demo, caches, mode, dtype):
    cache = open_cache(caches[mode, dtype], cache_demo)
    dataset = PrealignedDataset.open(cache_demo["eta"], expected_teacher_fingerprint=None,
                                     expected_student_fingerprint=None)
    assert (cache.mode, cache.dtype, cache.hidden_size, cache.num_examples) == (mode, dtype, 48, len(dataset))
    assert cache.bytes_per_row() == (2 * 48 + 4 if dtype == "bf16" else 48 + 8)
    total_rows = 0
    for i in range(len(dataset)):
        example = dataset[i]
        index = int(example["example_index"])
        positions = expected_positions(example, mode)
        np.testing.assert_array_equal(cache.positions(index), positions)
        rows = cache.rows(index)
        assert rows.dtype == torch.float32 and rows.shape == (positions.size, 48)
        live, config = live_hidden(cache_demo["teacher"], example["teacher_input_ids"])
        reference = live[positions]
        reorder = reorder_bound(config, live)
        quantisation = bf16_bound(np.abs(reference) + reorder) if dtype == "bf16" else fp8_bound(
            np.abs(reference) + reorder)
        error = np.abs(rows.double().numpy() - reference)
        assert np.all(error <= quantisation + reorder), (i, float((error - quantisation - reorder).max()))
        total_rows += positions.size
    manifest = json.loads((caches[mode, dtype] / "manifest.json").read_text())
    assert manifest["num_rows"] == total_rows > 0
    assert manifest["bytes_per_token"][dtype] == cache.bytes_per_row()


def test_all_positions_serves_the_aligned_rows(cache_demo, caches):
    """Same forward batches, so an all_positions cache mapped through the alignment gives the aligned cache's bytes."""
    aligned, everything = open_cache(caches["aligned", "bf16"], cache_demo), open_cache(
        caches["all_positions", "bf16"], cache_demo)
    dataset = PrealignedDataset.open(cache_demo["eta"], expected_teacher_fingerprint=None,
                                     expected_student_fingerprint=None)
    for i in range(len(dataset)):
        example = dataset[i]
        index = int(example["example_index"])
        torch.testing.assert_close(everything.aligned_rows(index, example["align_teacher"],
                                                           example["teacher_input_ids"]),
                                   aligned.rows(index), rtol=0, atol=0)
        torch.testing.assert_close(aligned.aligned_rows(index, example["align_teacher"]), aligned.rows(index),
                                   rtol=0, atol=0)
    assert everything.manifest["num_rows"] > aligned.manifest["num_rows"]


def _live_batch_hidden(teacher_dir: Path, batch: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.model(input_ids=batch["teacher_input_ids"],
                           attention_mask=batch["teacher_attention_mask"]).last_hidden_state


@pytest.mark.parametrize("data", ["eta", "self"])
def test_gather_of_a_collated_batch_matches_the_live_teacher(cache_demo, caches, data):
    """``gather``/``batch_hidden`` stand in for ``teacher_hidden_BTE[align_batch, align_teacher - 1]``; with the
    ``self`` folder (another student tokenizer) the all_positions cache is matched by its text fingerprint."""
    cache = TeacherCache.open(caches["all_positions", "bf16"], teacher_fingerprint=teacher_fingerprint(
        cache_demo["teacher"]), data_fingerprint=data_fingerprint(cache_demo[data]), hidden_size=48,
        text_fingerprint=text_fingerprint(cache_demo[data]))
    dataset = PrealignedDataset.open(cache_demo[data], expected_teacher_fingerprint=None,
                                     expected_student_fingerprint=None)
    examples = [dataset[i] for i in (5, 0, 17, 9)]
    examples[2] = {**examples[2], "is_repeat": True}  # a repeat slot keeps its row but loses its pairs
    batch = Collator(0, 0)(examples)
    live_BTE = _live_batch_hidden(cache_demo["teacher"], batch)
    wanted = live_BTE[batch["align_batch"], batch["align_teacher"] - 1].double()
    got = cache.gather(batch)
    bound = 2.0**-8 * (wanted.abs() + 1e-3) + 1e-3
    assert got.shape == wanted.shape and bool(((got.double() - wanted).abs() <= bound).all())
    dense = cache.batch_hidden(batch)
    assert dense.shape == live_BTE.shape
    torch.testing.assert_close(dense[batch["align_batch"], batch["align_teacher"] - 1], got, rtol=0, atol=0)
    untouched = torch.ones(dense.shape[:2], dtype=torch.bool)
    untouched[batch["align_batch"], batch["align_teacher"] - 1] = False
    assert bool((dense[untouched] == 0).all())


# ---- refusals ---------------------------------------------------------------------------------------------------


def _refused(match_fields: tuple[str, ...], opener) -> str:
    with pytest.raises(CacheMismatch) as caught:
        opener()
    message = str(caught.value)
    assert "teacher.cache_dir" in message
    for text in match_fields:
        assert text in message, (text, message)
    return message


def test_mismatched_teacher_data_hidden_size_are_refused(cache_demo, caches):
    folder = caches["aligned", "bf16"]
    good = {"teacher_fingerprint": teacher_fingerprint(cache_demo["teacher"]),
            "data_fingerprint": data_fingerprint(cache_demo["eta"]), "hidden_size": 48}
    other_teacher = teacher_fingerprint(cache_demo["other_teacher"])
    assert other_teacher != good["teacher_fingerprint"]
    _refused(("teacher_fingerprint", good["teacher_fingerprint"], other_teacher),
             lambda: TeacherCache.open(folder, **{**good, "teacher_fingerprint": other_teacher}))
    other_data = data_fingerprint(cache_demo["self"])
    _refused(("data_fingerprint", good["data_fingerprint"], other_data),
             lambda: TeacherCache.open(folder, **{**good, "data_fingerprint": other_data}))
    _refused(("hidden_size", "48", "64"), lambda: TeacherCache.open(folder, **{**good, "hidden_size": 64}))
    # An aligned cache is tied to its prealigned folder even when the text matches.
    _refused(("data_fingerprint",), lambda: TeacherCache.open(
        folder, **{**good, "data_fingerprint": other_data}, text_fingerprint=text_fingerprint(cache_demo["self"])))
    # An all_positions cache from other text is refused by its text fingerprint.
    shared = caches["all_positions", "bf16"]
    _refused(("text_fingerprint", "0" * 64), lambda: TeacherCache.open(
        shared, **{**good, "data_fingerprint": other_data}, text_fingerprint="0" * 64))


def test_incomplete_or_corrupted_cache_is_refused(cache_demo, caches, tmp_path):
    good = {"teacher_fingerprint": teacher_fingerprint(cache_demo["teacher"]),
            "data_fingerprint": data_fingerprint(cache_demo["eta"]), "hidden_size": 48}
    _refused(("not a directory",), lambda: TeacherCache.open(tmp_path / "missing", **good))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(caches["aligned", "fp8_e4m3"], incomplete)
    (incomplete / "manifest.json").unlink()
    _refused(("manifest.json", "incomplete"), lambda: TeacherCache.open(incomplete, **good))

    corrupted = tmp_path / "corrupted"
    shutil.copytree(caches["aligned", "fp8_e4m3"], corrupted)
    data = bytearray((corrupted / "hidden-00001.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupted / "hidden-00001.bin").write_bytes(bytes(data))
    _refused(("shards[1].hidden_sha256",), lambda: TeacherCache.open(corrupted, **good))

    old_version = tmp_path / "old_version"
    shutil.copytree(caches["aligned", "fp8_e4m3"], old_version)
    manifest = json.loads((old_version / "manifest.json").read_text())
    (old_version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    _refused(("format_version", "99"), lambda: TeacherCache.open(old_version, **good))


def test_an_example_with_other_teacher_ids_is_refused(cache_demo, caches):
    cache = open_cache(caches["all_positions", "bf16"], cache_demo)
    dataset = PrealignedDataset.open(cache_demo["eta"], expected_teacher_fingerprint=None,
                                     expected_student_fingerprint=None)
    example = dataset[3]
    index = int(example["example_index"])
    cache.check_teacher_ids(index, example["teacher_input_ids"])
    changed = example["teacher_input_ids"].copy()
    changed[1] += 1
    _refused(("teacher_ids_digest", f"example_index {index}"),
             lambda: cache.aligned_rows(index, example["align_teacher"], changed))
    _refused(("example_index 999999",), lambda: cache.rows(999999))
    # A position outside the example's response-predicting rows is refused, not read from a neighbour.
    _refused(("positions",), lambda: cache.aligned_rows(index, np.array([1])))


def test_teacher_fingerprint_follows_config_and_weights(cache_demo, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(cache_demo["teacher"], copy)
    assert teacher_fingerprint(copy) == teacher_fingerprint(cache_demo["teacher"])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor (inside the sampled last MiB)
    weights.write_bytes(bytes(data))
    changed_weights = teacher_fingerprint(copy)
    assert changed_weights != teacher_fingerprint(cache_demo["teacher"])
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5 * math.pi}))
    assert teacher_fingerprint(copy) != changed_weights
