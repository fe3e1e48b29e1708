"""Under torchrun (2 ranks): fp32 master weights of a bf16 ZeRO-3 engine start from given fp32 values.

    torchrun --nproc_per_node 2 tests/engine/master_weights_check.py RESULT.json

Parameter sizes are odd (9, 3, 3, 1 elements), so the last rank's partitions are padded, the case where
DeepSpeed's ``safe_set_full_fp32_param`` would slice past the end. Rank 0 writes, per parameter, whether the
fp32 master read back with ``safe_get_full_fp32_param`` equals the fp32 value exactly, and whether that value
differs from its bf16 rounding (else the check could not tell the two apart).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(result_path: str) -> int:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from dskd_scale.engine.build import cast_for_engine, start_master_weights_from
    from dskd_scale.engine.distributed import init_distributed, rank

    init_distributed("", skip_cpu_shm_op=True)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    values = cast_for_engine(module, torch.bfloat16)
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=config)
    start_master_weights_from(engine, values)
    report = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param).cpu().reshape(values[name].shape)  # collective
        report[name] = {"numel": values[name].numel(), "dtype": str(param.dtype),
                        "master_equals_fp32": bool(torch.equal(master, values[name])),
                        "fp32_differs_from_bf16": bool((values[name].bfloat16().float() != values[name]).any())}
    if rank() == 0:
        Path(result_path).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    exit_code = main(sys.argv[1])
    from dskd_scale.engine.distributed import barrier, shutdown

    # Leave the process group together: exiting with gloo's threads alive can abort a rank at teardown
    # ("terminate called without an active exception").
    barrier()
    shutdown()
    sys.exit(exit_code)
