"""Round trip on real assets: prealign output (Dolly, GPT-2 student, Llama-2 teacher) -> verified dataset -> batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dskd_scale.data import DataError, PrealignedDataset, build_train_loader
from dskd_scale.data.format import tokenizer_fingerprint
from dskd_scale.utils.assets import asset_path, missing_asset_reason

pytestmark = pytest.mark.assets
ROWS = 24


def _asset(relative: str) -> Path:
    path = asset_path(relative)
    if path is None:
        pytest.skip(missing_asset_reason(relative))
    return path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """(prealigned folder, student tokenizer, teacher tokenizer, fingerprints by role), built once per module."""
    from transformers import AutoTokenizer

    from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign

    dolly, student_dir, teacher_dir = (
        _asset(p) for p in ("data/dolly/dev.jsonl", "tokenizers/gpt2", "tokenizers/llama2")
    )
    tmp = tmp_path_factory.mktemp("roundtrip")
    subset = tmp / "dolly_subset.jsonl"
    with open(dolly, encoding="utf-8") as source:
        subset.write_text("".join(line for _, line in zip(range(ROWS), source, strict=False)), encoding="utf-8")
    out = tmp / "prealigned"
    config = PrealignConfig(
        teacher_tokenizer=str(teacher_dir),
        student_tokenizer=str(student_dir),
        data=(str(subset),),
        out=str(out),
        max_length=192,
        num_shards=2,
    )
    run_prealign(config)
    student = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    teacher = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    fingerprints = {"student": tokenizer_fingerprint(student), "teacher": tokenizer_fingerprint(teacher)}
    return out, student, teacher, fingerprints


def test_prealign_output_reads_back_and_aligned_tokens_survive_collate(real_run):
    out, student, teacher, fingerprints = real_run
    ds = PrealignedDataset.open(
        out,
        expected_teacher_fingerprint=fingerprints["teacher"],
        expected_student_fingerprint=fingerprints["student"],
    )
    assert len(ds) == sum(shard["rows"] for shard in ds.manifest["shards"]) > ROWS // 2
    texts = []
    for rank in range(2):
        loader = build_train_loader(ds, rank=rank, world_size=2, micro_batch_size=4, seed=0, group_by_length=True)
        for batch in loader:
            b, s, t = batch["align_batch"], batch["align_student"], batch["align_teacher"]
            # Aligned tokens cover the same characters; single-token decodes differ only in the word prefix
            # (GPT-2 keeps the space of "Ġthe", Llama drops the one of "▁the").
            # EOS pairs with EOS (Contract 1).
            student_text = [
                "EOS" if i == student.eos_token_id else student.decode([i]).strip()
                for i in batch["student_input_ids"][b, s].tolist()
            ]
            teacher_text = [
                "EOS" if i == teacher.eos_token_id else teacher.decode([i]).strip()
                for i in batch["teacher_input_ids"][b, t].tolist()
            ]
            assert student_text == teacher_text
            texts += student_text
            assert (batch["student_labels"][b, s] >= 0).all() and (batch["teacher_labels"][b, t] >= 0).all()
            assert batch["student_input_ids"].shape[1] == int(batch["student_attention_mask"].sum(1).max())
    assert len(texts) > 300 and sum(len(text) > 2 for text in texts) > 150  # mostly real words, not blanks
    eos = np.array([ds[i]["student_input_ids"][-1] for i in range(len(ds))])
    assert (eos == student.eos_token_id).mean() > 0.5  # rows end with EOS unless truncated


def test_swapped_teacher_and_student_tokenizers_are_refused(real_run):
    out, _, _, fingerprints = real_run
    with pytest.raises(DataError, match=r"manifest\.json.*'teacher_tokenizer\.fingerprint'.*llama2"):
        PrealignedDataset.open(
            out,
            expected_teacher_fingerprint=fingerprints["student"],
            expected_student_fingerprint=fingerprints["teacher"],
        )
