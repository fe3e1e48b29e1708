"""Training from a teacher hidden-state cache (``teacher.cache_dir``): no teacher engine, the rows come with the batch.

Unit tests: the frozen head is read alone from the teacher's safetensors (tied and untied heads); the config
refuses what a cache cannot serve; the collator lays the cached rows out in the batch's alignment order. 2-rank
ZeRO-3 runs (one launch, ``run_worker.py``, port 29800; one 1-rank launch, port 29802): a run from a bf16 cache
gives the live run's losses within bf16 rounding and builds no teacher engine, resume from a cache reproduces
the losses, and a cache of another teacher or other data is refused before any engine is built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import PROJECT_ROOT, check, demo_overrides, launch, run_jobs

from dskd_scale.config.loader import ConfigError, load_config
from dskd_scale.config.run import RunConfig
from dskd_scale.data.collate import Collator

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7; round to nearest bf16 moves a value by <= eps/2 relative
CONFIG = "configs/tests/tiny_dskd_eta.yaml"
QUIET = ["checkpoint.export_at_end=false", "log.tensorboard=false", "engine.skip_cpu_shm_op=true"]


# ---- units -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["models/tiny-gpt2", "models/llama-2-tiny-random-hf"])
def test_frozen_teacher_head_is_read_alone_from_safetensors(asset, model):
    """GPT-2 ties its head to the input embedding (only ``transformer.wte.weight`` is stored); the Llama head is
    its own ``lm_head.weight``. Both come out equal to the loaded model's head, frozen, in the asked dtype."""
    from transformers import AutoModelForCausalLM

    from dskd_scale.config.run import ModelConfig
    from dskd_scale.engine.build import _frozen_teacher_head

    folder = asset(model)
    head = _frozen_teacher_head(ModelConfig(path=str(folder)), dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).get_output_embeddings().weight
    assert head.weight.dtype == torch.bfloat16 and not head.weight.requires_grad
    assert torch.equal(head.weight, reference)
    assert (head.out_features, head.in_features) == tuple(reference.shape)


@pytest.mark.parametrize("overrides,needles", [
    (["kd.criterion=uld"], ["teacher.cache_dir", "kd.criterion=uld"]),
    (["kd.criterion=mined", "kd.mined_map=m.safetensors"], ["teacher.cache_dir", "kd.criterion=mined"]),
    (["kd.criterion=dskd_cma"], ["teacher.cache_dir", "kd.criterion=dskd_cma"]),
    (["data.eval_dir=somewhere"], ["teacher.cache_dir", "data.eval_dir"]),
    (["kd.on_policy.ratio=0.5"], ["teacher.cache_dir", "kd.on_policy.ratio"]),
    (["teacher.path=", "teacher.architecture=llama"], ["teacher.cache_dir", "needs teacher.path"]),
])
def test_config_refuses_what_a_cache_cannot_serve(overrides, needles):
    base = ["teacher.path=some/teacher", "teacher.cache_dir=some/cache"]
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, PROJECT_ROOT / CONFIG, base + overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_config_accepts_a_cache_for_the_aligned_row_criteria():
    for criterion in ("dskd", "dskd_eta", "vanilla_kd"):
        cfg = load_config(RunConfig, PROJECT_ROOT / CONFIG, [f"kd.criterion={criterion}", "teacher.path=t",
                                                              "teacher.cache_dir=c"])
        assert cfg.teacher.cache_dir == "c"
    with pytest.raises(ConfigError, match="student.cache_dir"):
        load_config(RunConfig, PROJECT_ROOT / CONFIG, ["student.cache_dir=c"])


class _FakeCache:
    """Rows of example ``i`` at teacher position ``p``: ``[i, p, 0.5]`` (so each row names where it came from)."""

    def aligned_rows(self, example_index, align_teacher, teacher_input_ids):
        positions = np.asarray(align_teacher, dtype=np.float32) - 1
        return torch.from_numpy(np.stack([np.full_like(positions, example_index), positions,
                                          np.full_like(positions, 0.5)], axis=1))


def _example(index: int, align_teacher: list[int], *, repeat: bool = False) -> dict:
    length = max(align_teacher) + 1
    ids = np.arange(length, dtype=np.int32)
    return {"student_input_ids": ids, "student_labels": ids, "teacher_input_ids": ids, "teacher_labels": ids,
            "align_student": np.asarray(align_teacher, np.int32), "align_teacher": np.asarray(align_teacher, np.int32),
            "example_index": np.int64(index), "is_repeat": repeat}


def test_cached_rows_follow_the_batch_alignment_order_and_skip_repeat_rows():
    from dskd_scale.data.loader import CachedTeacherRows

    rows = CachedTeacherRows(_FakeCache())
    examples = [_example(7, [2, 3, 5]), _example(3, [1, 4]), _example(9, [2, 6], repeat=True)]
    for example in examples:
        example["teacher_hidden_rows"] = rows(example)
    batch = Collator(0, 0)(examples)
    hidden_AE = batch["teacher_hidden_rows"]
    assert hidden_AE.dtype == torch.float32 and hidden_AE.shape == (5, 3)  # the repeat slot's pairs are dropped
    expected = torch.stack([batch["example_index"][batch["align_batch"]].float(),
                            batch["align_teacher"].float() - 1, torch.full((5,), 0.5)], dim=1)
    assert torch.equal(hidden_AE, expected)


def test_collator_refuses_rows_that_do_not_match_the_pairs():
    example = _example(4, [1, 2, 3])
    example["teacher_hidden_rows"] = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="example_index 4: 2 cached teacher rows for 3 alignment pairs"):
        Collator(0, 0)([example])


def test_non_finite_cached_rows_mark_the_micro_batch():
    """A cached row that is not finite makes the step skip, as a live teacher's would (loop's non-finite check)."""
    from dskd_scale.loop import _teacher_nonfinite

    batch = {"student_attention_mask": torch.ones(2, 3, dtype=torch.long),
             "teacher_hidden_rows": torch.zeros(4, 8)}
    assert not bool(_teacher_nonfinite(None, batch))
    batch["teacher_hidden_rows"][2, 5] = float("inf")
    assert bool(_teacher_nonfinite(None, batch))


# ---- the cache of the demo teacher, and runs from it -------------------------------------------------------------

LOSS_TERMS = ("train/loss", "train/ce", "train/kd_t2s", "train/ce_t2s", "train/kd_s2t")


def _write_cache(demo, out, *, same_vocab: bool = False) -> None:
    from dskd_scale.config.run import ModelConfig
    from dskd_scale.teacher_cache.writer import CacheWriteConfig, run_cache_teacher

    teacher = ModelConfig(path=str(demo["teacher_same" if same_vocab else "teacher"]),
                          tokenizer=str(demo["student_tokenizer" if same_vocab else "teacher_tokenizer"]))
    run_cache_teacher(CacheWriteConfig(teacher=teacher, data_dir=str(demo["same" if same_vocab else "eta"]),
                                       out=str(out), dtype="bf16", num_shards=3, batch_size=5))


@pytest.fixture(scope="module")
def demo_cache(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher_cache") / "bf16"
    _write_cache(demo, folder)
    return folder


def _cache_job(demo, work, name: str, extra: list[str], *, folder: str = "", cache=None, config: str = CONFIG
               ) -> dict:
    same_vocab = config != CONFIG
    overrides = demo_overrides(demo, same_vocab=same_vocab, output_dir=work / (folder or name)) + QUIET + extra
    if cache is not None:
        overrides.append(f"teacher.cache_dir={cache}")
    return {"name": name, "config": config, "overrides": overrides}


@pytest.fixture(scope="module")
def cache_runs(demo, demo_cache, tmp_path_factory):
    work = tmp_path_factory.mktemp("cache_runs")
    short = ["optim.max_steps=3", "checkpoint.every_steps=0"]
    resume = ["checkpoint.every_steps=2", "optim.lr=2.0e-2", "optim.projector_lr=2.0e-2"]
    jobs = [_cache_job(demo, work, "live", short), _cache_job(demo, work, "cached", short, cache=demo_cache),
            _cache_job(demo, work, "resume_ref", resume + ["optim.max_steps=4"], cache=demo_cache),
            _cache_job(demo, work, "resume_part", resume + ["optim.max_steps=2"], cache=demo_cache),
            _cache_job(demo, work, "resume_rest", resume + ["optim.max_steps=4"], folder="resume_part",
                       cache=demo_cache)]
    same_cache = work / "cache_same_vocab"
    _write_cache(demo, same_cache, same_vocab=True)
    vanilla = "configs/tests/tiny_vanilla_kd.yaml"
    jobs += [_cache_job(demo, work, "vanilla_live", short, config=vanilla),
             _cache_job(demo, work, "vanilla_cached", short, cache=same_cache, config=vanilla)]
    results, _ = run_jobs(jobs, work=work / "launch", ranks=2, port=29800)
    return work, results


def test_cached_rows_are_the_live_teachers_hidden_states_at_the_aligned_positions(demo, demo_cache):
    """The loader's ``teacher_hidden_rows`` against a live fp32 forward of the same batches: the writer rounded its
    fp32 hidden states to the nearest bf16 (relative error <= 2^-8), and its forward ran other batch shapes than this
    one (fp32 accumulation-order noise, bounded as in ``logits_tolerance``)."""
    from engine_helpers import logits_tolerance
    from transformers import AutoModelForCausalLM

    from dskd_scale.data.loader import build_train_loader
    from dskd_scale.models.build import body_of
    from dskd_scale.train_setup import open_teacher_cache

    cfg = load_config(RunConfig, PROJECT_ROOT / CONFIG, demo_overrides(demo, same_vocab=False, output_dir="unused")
                      + [f"teacher.cache_dir={demo_cache}"])
    rows = open_teacher_cache(cfg)
    assert rows is not None and rows.cache.dtype == "bf16"
    from dskd_scale.data.dataset import PrealignedDataset

    dataset = PrealignedDataset.open(demo["eta"], expected_teacher_fingerprint=None, expected_student_fingerprint=None)
    loader = build_train_loader(dataset, rank=0, world_size=1, micro_batch_size=4, seed=3, group_by_length=True,
                                teacher_rows=rows)
    teacher = AutoModelForCausalLM.from_pretrained(demo["teacher"], dtype=torch.float32).eval()
    compared = 0
    for batch in loader:
        with torch.no_grad():
            hidden_BTE = body_of(teacher)(input_ids=batch["teacher_input_ids"],
                                          attention_mask=batch["teacher_attention_mask"]).last_hidden_state
        live_AE = hidden_BTE[batch["align_batch"], batch["align_teacher"] - 1]
        cached_AE = batch["teacher_hidden_rows"]
        noise = logits_tolerance(teacher.config, hidden_BTE)["atol"]
        assert torch.all((cached_AE - live_AE).abs() <= 2.0**-8 * live_AE.abs() + noise), batch["example_index"]
        compared += live_AE.shape[0]
    assert compared > 100


@pytest.mark.dist
@pytest.mark.e2e
def test_cached_run_matches_the_live_run_within_bf16_rounding_and_builds_no_teacher(cache_runs):
    """Same saved models, data and seed; the only difference is the teacher's hidden states at the aligned rows,
    rounded to the nearest bf16 by the cache (relative error <= eps/2 per value, eps = 2^-7). Every teacher input
    of the losses is linear in them (teacher logits ``W_t h``, projected rows ``W_s P h``), so each term, a mean of
    log-probability expressions, moves by at most about eps relative to the log-probabilities it averages (the
    bound test_bf16 uses for rounding every input); terms near zero get the same bound at unit scale. Adam's first
    updates are ~lr·sign(g), so the later steps' weights (and losses) stay within it too."""
    work, results = cache_runs
    live, cached = results["live"]["metrics"], results["cached"]["metrics"]
    assert sorted(live) == sorted(cached) == [1, 2, 3]
    for step in live:
        for term in LOSS_TERMS:
            assert cached[step][term] == pytest.approx(live[step][term], rel=BF16_EPS, abs=BF16_EPS), (step, term)
        assert cached[step]["train/nonfinite_teacher"] == 0 and cached[step]["train/skipped_steps"] == 0
    # The terms are not bitwise equal: the cached run really read the rounded rows, not a live teacher.
    assert any(cached[step][term] != live[step][term] for step in live for term in LOSS_TERMS)
    # No teacher engine: no teacher DeepSpeed config and no teacher state report (written only for an engine).
    assert (work / "live" / "ds_config_teacher.json").is_file()
    assert not (work / "cached" / "ds_config_teacher.json").exists()
    assert not list((work / "cached").glob("teacher_state_rank*.json"))
    assert len(list((work / "live").glob("teacher_state_rank*.json"))) == 2


@pytest.mark.dist
@pytest.mark.e2e
def test_cached_vanilla_kd_matches_the_live_run_within_bf16_rounding(cache_runs):
    """Same-vocabulary vanilla KD reads the teacher only at the aligned rows (every response position): the same
    bound as for DSKD (its teacher logits ``W_t h`` are linear in the rounded rows)."""
    work, results = cache_runs
    live, cached = results["vanilla_live"]["metrics"], results["vanilla_cached"]["metrics"]
    assert sorted(live) == sorted(cached) == [1, 2, 3]
    for step in live:
        for term in ("train/loss", "train/ce", "train/kd"):
            assert cached[step][term] == pytest.approx(live[step][term], rel=BF16_EPS, abs=BF16_EPS), (step, term)
    assert any(cached[step]["train/kd"] != live[step]["train/kd"] for step in live)
    assert not (work / "vanilla_cached" / "ds_config_teacher.json").exists()


@pytest.mark.dist
@pytest.mark.e2e
def test_resume_with_a_cache_reproduces_the_uninterrupted_run(cache_runs):
    """4 steps at once vs 2 steps, then a resume to 4 (3 steps per epoch: the resume crosses an epoch boundary, so
    the cached rows must follow the reshuffled order)."""
    _, results = cache_runs
    reference, resumed = results["resume_ref"]["metrics"], results["resume_rest"]["metrics"]
    assert sorted(results["resume_part"]["metrics"]) == [1, 2]
    assert sorted(resumed) == [1, 2, 3, 4] and results["resume_rest"]["train_rows"] == 4
    for step in (3, 4):
        for term in LOSS_TERMS:
            assert resumed[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-9), (step, term)


def test_a_cache_of_other_data_is_refused_naming_the_key_and_field(demo, demo_cache, tmp_path):
    """The data fingerprint is the prealigned manifest's bytes: a folder whose manifest differs is other data."""
    import shutil

    from dskd_scale.data.dataset import DataError
    from dskd_scale.train_setup import open_teacher_cache

    other = tmp_path / "other_data"
    shutil.copytree(demo["eta"], other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"note": "re-made", ', 1))
    overrides = demo_overrides(demo, same_vocab=False, output_dir="unused") + [
        f"teacher.cache_dir={demo_cache}", f"data.train_dir={other}"]
    with pytest.raises(DataError) as err:
        open_teacher_cache(load_config(RunConfig, PROJECT_ROOT / CONFIG, overrides))
    assert "teacher.cache_dir" in str(err.value) and "data_fingerprint" in str(err.value)
    missing = demo_overrides(demo, same_vocab=False, output_dir="unused") + [f"teacher.cache_dir={tmp_path / 'no'}"]
    with pytest.raises(DataError, match="teacher.cache_dir"):
        open_teacher_cache(load_config(RunConfig, PROJECT_ROOT / CONFIG, missing))


@pytest.mark.dist
def test_a_cache_of_another_teacher_is_refused_before_any_engine_is_built(demo, demo_cache, tmp_path):
    """launch/train.py with the same-vocabulary teacher and data but the ETA teacher's cache: exit 2, one message
    naming teacher.cache_dir and the teacher fingerprint, and nothing built or written."""
    out = tmp_path / "refused"
    overrides = demo_overrides(demo, same_vocab=True, output_dir=out) + QUIET + [
        "kd.criterion=dskd", f"teacher.cache_dir={demo_cache}"]
    result = launch("configs/tests/tiny_dskd.yaml", overrides, ranks=1, port=29802)
    check(result, expected=2)
    assert "teacher.cache_dir" in result.stderr and "teacher_fingerprint" in result.stderr
    assert "engines built" not in result.stdout + result.stderr
    assert not (out / "ds_config.json").exists() and not (out / "metrics.jsonl").exists()
