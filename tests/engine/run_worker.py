"""Several training runs in ONE torchrun launch (one process group), for tests that compare runs.

    torchrun --nproc_per_node 2 tests/engine/run_worker.py JOBS.json RESULT.json

``JOBS.json`` is a list of ``{"name", "config", "overrides", "probe_master"?, "probe_teacher"?}``. Each job is
built with ``setup_run`` and trained with ``loop.train`` exactly as ``launch/train.py`` does; rank 0 writes
``{name: {"exit": int, "metrics": {step: row}, ...probes}}``. A launch costs ~10 s of start-up on CPU, a job
of a few tiny steps ~1 s, so the tests put many jobs in one launch.

Probes (collectives, run on every rank right after the engines are built, before any step):
- ``probe_master``: the t2s projector's fp32 master weight (``deepspeed.utils.safe_get_full_fp32_param``), its
  low-precision parameter, the gathered overlap rows of both heads that its initialisation came from, and the
  dtypes of the pinv s2t map's matrices after a rebuild.
- ``probe_teacher``: the teacher's last hidden states on fixed random ids (fp32 copy), its dtype and type.

With ``ATEN_CPU_CAPABILITY`` forced (the suite's check that it passes on any x86 CPU), attention runs on
PyTorch's math backend: torch 2.13's CPU flash-attention kernel picks its bf16 VNNI/AMX packing from the
hardware but the packing routine from the forced capability, and raises ``pack_vnni2 is only supported when
avx512 is supported`` for sequences of 64+ tokens on an AMX machine forced to ``default``/``avx2`` (a CPU that
really lacks AVX-512 never takes that path).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def probe_master(setup) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from dskd_scale.models.build import head_of

    engines = setup.engines
    weight = engines.student_module.t2s_projector.weight
    master = safe_get_full_fp32_param(weight)
    vocab_map = load_file(str(Path(setup.cfg.data.train_dir) / "vocab_map.safetensors"))
    student_head, teacher_head = head_of(engines.student_module.student).weight, engines.teacher.module.head.weight
    with deepspeed.zero.GatheredParameters([weight, student_head, teacher_head]):
        low = weight.detach().float().clone()
        student_rows = student_head.detach()[vocab_map["overlap_student_ids"]].double().clone()
        teacher_rows = teacher_head.detach()[vocab_map["overlap_teacher_ids"]].double().clone()
    engines.student_head.refresh()  # collective, as at the start of every step: rebuilds the s2t map
    s2t = engines.s2t_map
    return {"master": master.float().cpu(), "param": low.cpu(), "param_dtype": str(weight.dtype),
            "student_rows": student_rows.cpu(), "teacher_rows": teacher_rows.cpu(),
            "s2t_dtypes": [str(s2t.pinv_EO.dtype), str(s2t.matrix_ED.dtype)]}


def probe_teacher(setup) -> dict:
    from dskd_scale.engine.distributed import device

    generator = torch.Generator().manual_seed(0)  # the same ids on every rank and in every job
    ids = torch.randint(0, len(setup.engines.teacher_tokenizer), (2, 24), generator=generator).to(device())
    with torch.no_grad():
        hidden = setup.engines.teacher(ids, torch.ones_like(ids))
    return {"teacher_hidden": hidden.float().cpu(), "teacher_param_dtype": str(
        next(setup.engines.teacher.module.parameters()).dtype), "teacher_type": type(setup.engines.teacher).__name__}


def main(jobs_path: str, result_path: str) -> int:
    from dskd_scale.engine.distributed import rank

    results, tensors = {}, {}
    attention = contextlib.nullcontext()
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(SDPBackend.MATH)
    with attention:
        run_jobs(jobs_path, results, tensors)
    if rank() == 0:
        Path(result_path).write_text(json.dumps(results))
        torch.save(tensors, Path(result_path).with_suffix(".pt"))
    return 0


def run_jobs(jobs_path: str, results: dict, tensors: dict) -> None:
    from dskd_scale.config.loader import load_config
    from dskd_scale.config.run import RunConfig
    from dskd_scale.engine.distributed import barrier, rank
    from dskd_scale.loop import train
    from dskd_scale.train_setup import setup_run

    for job in json.loads(Path(jobs_path).read_text()):
        cfg = load_config(RunConfig, ROOT / job["config"], job["overrides"])
        setup = setup_run(cfg)
        entry = {}
        for probe, function in (("probe_master", probe_master), ("probe_teacher", probe_teacher)):
            if job.get(probe):
                tensors[job["name"]] = {**tensors.get(job["name"], {}), **function(setup)}
        entry["exit"] = train(setup)
        barrier()
        if rank() == 0:
            rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
            train_rows = [row for row in rows if "train/loss" in row]
            entry["metrics"] = {row["step"]: row for row in train_rows}
            entry["train_rows"] = len(train_rows)  # rows in the run folder's metrics.jsonl, earlier runs included
        results[job["name"]] = entry
        del setup
        gc.collect()


if __name__ == "__main__":
    exit_code = main(*sys.argv[1:3])
    from dskd_scale.engine.distributed import barrier, shutdown

    # Leave the process group together: exiting with gloo's threads alive can abort a rank at teardown
    # ("terminate called without an active exception").
    barrier()
    shutdown()
    sys.exit(exit_code)
