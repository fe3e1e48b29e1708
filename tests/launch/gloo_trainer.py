"""A tiny gloo data-parallel trainer that behaves like launch/train.py towards launchers.

Used where launch/train.py cannot honour this test folder's port range: under MPI, DeepSpeed's discovery pins
MASTER_PORT to 29500. It keeps train.py's launcher-facing contract, so it also serves for trying the scripts by hand:

    python gloo_trainer.py --config RUN.yaml [output_dir=... steps=... step_seconds=...]

Contract mirrored from launch/train.py: rank/world from env:// (torchrun, srun mapping) or MPI (PMI_RANK /
mpi4py); SIGTERM/SIGUSR1 set a flag, ranks agree with one all-reduce per step, checkpoint together and exit 75;
a start resumes from the latest checkpoint in the output dir. Rank 0 appends ``step <k> loss <x>`` lines to
``<output_dir>/losses.txt`` and every rank writes ``rank<r>.json`` (host, world size) when done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75


def parse_args() -> dict[str, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    settings = dict(line.split(":", 1) for line in Path(args.config).read_text().splitlines() if ":" in line)
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    for item in args.overrides:
        key, _, value = item.partition("=")
        settings[key] = value
    return settings


def init_process_group() -> tuple[int, int]:
    if "RANK" not in os.environ and "PMI_RANK" in os.environ:
        # mpiexec / srun --mpi=pmi2: mpi4py gives the ranks, rank 0 publishes the rendezvous address.
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(comm.bcast(os.environ.get("MASTER_PORT", "29699"), root=0))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> int:
    settings = parse_args()
    out = Path(settings["output_dir"])
    steps, step_seconds = int(settings["steps"]), float(settings.get("step_seconds", "0"))
    stop = {"signal": 0}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    rank, world = init_process_group()
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    weight = torch.zeros(8, requires_grad=True)
    inputs, targets = torch.randn(64, 8), torch.randn(64)
    optimizer = torch.optim.SGD([weight], lr=0.05)
    start = 0
    latest = out / "ckpt" / "latest"
    if latest.exists():
        state = torch.load(out / "ckpt" / latest.read_text().strip() / "state.pt")
        weight.data.copy_(state["weight"])
        start = state["step"]
        if rank == 0:
            print(f"resumed from step {start}", flush=True)

    for step in range(start + 1, steps + 1):
        rows = slice(rank * 8 + (step % 4) * 16, rank * 8 + (step % 4) * 16 + 8)
        loss = ((inputs[rows] @ weight - targets[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        dist.all_reduce(weight.grad)
        weight.grad /= world
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        if rank == 0:
            with open(out / "losses.txt", "a") as handle:
                handle.write(f"step {step} loss {global_loss.item() / world:.8f}\n")
            print(f"step {step}", flush=True)
        time.sleep(step_seconds)
        flag = torch.tensor(float(stop["signal"] != 0))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 or step == steps:
            if rank == 0:
                folder = out / "ckpt" / f"step{step}"
                folder.mkdir(parents=True, exist_ok=True)
                torch.save({"weight": weight.detach(), "step": step}, folder / "state.pt")
                latest.write_text(folder.name)
            dist.barrier()
            if flag.item() > 0:
                if rank == 0:
                    print(f"checkpointed at step {step} after a signal", flush=True)
                dist.destroy_process_group()
                return EXIT_REQUEUE
    where = {"rank": rank, "world": world, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME")}
    (out / f"rank{rank}.json").write_text(json.dumps(where))
    dist.destroy_process_group()
    return 0


def _exit(status: int) -> None:
    """Finalize MPI (if used) and leave without the interpreter's teardown: under mpiexec, gloo's and MPI's C++
    destructors racing at exit aborted a finished rank ("terminate called without an active exception", signal 6)
    about once in ten runs."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit(main())
