#!/usr/bin/env python
"""Distil a teacher into a student on DeepSpeed (ZeRO-3), from a run config plus dotted overrides.

    deepspeed --num_gpus 8 launch/train.py --config configs/runs/dolly_qwen1.5-1.8b_to_gpt2-120m_dskd_eta.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/tests/tiny_dskd_eta.yaml data.train_dir=DIR
    python launch/train.py --config configs/tests/tiny_sft.yaml output_dir=runs/x     (one process)
    python launch/train.py --config CFG --dry-run --world-size 16 --nodes 2    (pre-flight check, plan, memory)

Relative paths in the config and in overrides are resolved against the current working directory.

On CPU: `deepspeed --num_gpus 2 launch/train.py ...` (gloo). Exit status: 0 done, 2 bad config/data,
3 training diverged (optim.max_consecutive_skipped_steps skipped steps in a row; nothing exported),
75 requeue me: checkpointed after SIGTERM/SIGUSR1, or a checkpoint could not be written for lack of space or
an I/O error (`latest` still names the previous complete one; 1 for other write errors, e.g. permissions).
Each failure is one line on stderr; with DSKD_EXIT_DIR set (the launch/ wrappers set it) the line and status
also go to DSKD_EXIT_DIR/rank<N>, so a wrapper whose launcher (torchrun, deepspeed, mpiexec) reports only
"a child failed" can end with that line and status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 deprecates; the warning repeats every step
# and buries the training log. Nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_scale.config.loader import ConfigError, config_to_dict, load_config  # noqa: E402
from dskd_scale.config.run import RunConfig  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_REQUEUE = 75  # = dskd_scale.engine.signals.EXIT_REQUEUE (not imported here: it pulls in deepspeed)
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def fail(status: int, message: str, *, report: bool = True) -> int:
    """Print ``message`` (one line) and leave it for the launch wrapper in ``$DSKD_EXIT_DIR``; returns ``status``."""
    if not report:
        return status
    print(message, file=sys.stderr)
    exit_dir = os.environ.get("DSKD_EXIT_DIR")
    if exit_dir:
        rank = next((os.environ[var] for var in _RANK_VARS if var in os.environ), "0")
        try:
            os.makedirs(exit_dir, exist_ok=True)
            with open(os.path.join(exit_dir, f"rank{rank}"), "w") as handle:
                handle.write(f"{status}\n{message}\n")
        except OSError:
            pass  # the message is on stderr already; a full or read-only disk must not hide it
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (configs/runs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="pre-flight check without GPUs: open the tokenizers, model configs and shards (paths, "
                             "fingerprints), then print the resolved config, DeepSpeed configs, global batch, steps "
                             "and a per-rank memory estimate; exit 2 listing every problem")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: total ranks to plan for (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="--dry-run: nodes the ranks are spread over (default: WORLD_SIZE / $LOCAL_WORLD_SIZE, "
                             "else 1)")
    parser.add_argument("--plan-cache", action="store_true",
                        help="--dry-run: also size a teacher hidden-state cache of data.train_dir (bytes in bf16 and "
                             "fp8_e4m3, bytes read per step; always shown when teacher.cache_dir is set)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # Set by launch/run_deepspeed.sh where environment variables do not reach the ranks (pdsh over ssh).
    parser.add_argument("--exit-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kd.temperature=2.0")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if not args.dry_run and (args.world_size is not None or args.nodes is not None):
        parser.error("--world-size/--nodes plan a --dry-run; a real run takes its ranks from the launcher")
    if not args.dry_run and args.plan_cache:
        parser.error("--plan-cache sizes a teacher cache in a --dry-run; write one with tools/cache_teacher.py")
    return args


def dry_run(cfg: RunConfig, world_size: int | None, nodes: int | None, plan_cache: bool = False) -> int:
    import yaml

    from dskd_scale.engine.dry_run import DryRunError, describe_run

    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if nodes is None:
        nodes = max(world_size // int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))), 1)
    try:
        report = describe_run(cfg, world_size=world_size, nodes=nodes, plan_cache=plan_cache)
    except DryRunError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    print("# resolved run config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    print("# DeepSpeed config (student engine)")
    print(json.dumps(report["student_ds_config"], indent=2))
    if report["teacher_ds_config"] is not None:
        print("# DeepSpeed config (teacher engine)")
        print(json.dumps(report["teacher_ds_config"], indent=2))
    print("# per-rank model-state memory (DeepSpeed ZeRO-3 estimator)")
    print(json.dumps(report["memory"], indent=2))
    if report["teacher_cache"] is not None:
        print("# teacher hidden-state cache of data.train_dir (bytes per row: bf16 2E+4, fp8_e4m3 E+8)")
        print(json.dumps(report["teacher_cache"], indent=2))
    print("# plan")
    print(json.dumps(report["plan"], indent=2))
    plan = report["plan"]
    print(f"dry run OK: {world_size} ranks on {nodes} node(s), global batch {plan['global_batch_size']}, "
          f"{plan['steps_per_epoch']} steps per epoch, {plan['total_steps']} steps in total")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.exit_dir:
        os.environ["DSKD_EXIT_DIR"] = args.exit_dir
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        return fail(EXIT_BAD_INPUT, str(err))
    if args.dry_run:
        return dry_run(cfg, args.world_size, args.nodes, args.plan_cache)

    from dskd_scale.data.dataset import DataError
    from dskd_scale.engine.checkpoint import CheckpointWriteError
    from dskd_scale.engine.distributed import shutdown
    from dskd_scale.engine.ds_config import DeepSpeedConfigError
    from dskd_scale.loop import TrainingDiverged, train
    from dskd_scale.models.build import ModelBuildError
    from dskd_scale.train_setup import setup_run

    try:
        setup = setup_run(cfg)
    except (DataError, DeepSpeedConfigError, ModelBuildError) as err:
        return fail(EXIT_BAD_INPUT, f"error: {err}")
    try:
        status = train(setup)
    except TrainingDiverged as err:  # decided on every rank: rank 0 reports
        shutdown()
        return fail(EXIT_DIVERGED, f"error: {err}", report=setup.rank == 0)
    except CheckpointWriteError as err:  # the rank that failed reports; the others may be stuck: no shutdown
        return fail(EXIT_REQUEUE if err.resumable else 1, f"error: {err}", report=err.reporter)
    shutdown()
    return status


def exit_without_teardown(status: int) -> None:
    """Leave with ``status`` once everything is written, skipping the interpreter's teardown.

    After a finished run (process group already destroyed, files closed), the C++ destructors of gloo and MPI
    threads sometimes raced at interpreter exit and aborted a rank ("terminate called without an active
    exception", SIGABRT) in about one suite run in two on this project's CI machine: the launcher then reported a
    completed run as failed. MPI is finalized first when it was used (mpiexec / srun --mpi), as its launcher
    expects.
    """
    import logging

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_without_teardown(main())
