#!/usr/bin/env python
"""Distil a teacher into a student on DeepSpeed (ZeRO-3), from a run config plus dotted overrides.

    deepspeed --num_gpus 8 launch/train.py --config configs/runs/dolly_qwen1.5-1.8b_to_gpt2-120m.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/tests/tiny_dskd_eta.yaml data.train_dir=DIR
    python launch/train.py --config configs/tests/tiny_sft.yaml output_dir=runs/x     (one process)
    python launch/train.py --config CFG --dry-run      (resolved run config, DS config, memory estimate; exit)

On CPU: `deepspeed --num_gpus 2 launch/train.py ...` (gloo). Exit status: 0 done, 2 bad config/data,
75 checkpointed after SIGTERM/SIGUSR1 (requeue me).
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (configs/runs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved run config, the DeepSpeed config and a per-rank memory estimate")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kd.temperature=2.0")
    return parser.parse_args(argv)


def dry_run(cfg: RunConfig) -> int:
    import yaml

    from dskd_scale.engine.dry_run import describe_run

    report = describe_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    print("# resolved run config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    print("# DeepSpeed config (student engine)")
    print(json.dumps(report["student_ds_config"], indent=2))
    if report["teacher_ds_config"] is not None:
        print("# DeepSpeed config (teacher engine)")
        print(json.dumps(report["teacher_ds_config"], indent=2))
    print("# per-rank model-state memory (DeepSpeed ZeRO-3 estimator)")
    print(json.dumps(report["memory"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        return dry_run(cfg)

    from dskd_scale.data.dataset import DataError
    from dskd_scale.engine.distributed import shutdown
    from dskd_scale.engine.ds_config import DeepSpeedConfigError
    from dskd_scale.loop import train
    from dskd_scale.models.build import ModelBuildError
    from dskd_scale.train_setup import setup_run

    try:
        setup = setup_run(cfg)
    except (DataError, DeepSpeedConfigError, ModelBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    status = train(setup)
    shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
