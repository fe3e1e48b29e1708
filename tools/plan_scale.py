#!/usr/bin/env python
"""Plan a distillation run at cluster scale from two config.json files: memory per GPU, teacher cache, step time.

    python tools/plan_scale.py --teacher /models/Qwen2.5-72B-Instruct --student /models/Qwen2.5-7B-Instruct \\
        --world-size 64 --nodes 8 --micro-batch-size 8 --seq-tokens 143 --rows-per-example 78 \\
        --train-examples 15000 --epochs 10 --gpu-tflops 989 --mfu 0.4 --inter-node-gbit-per-s 400 \\
        --intra-node-gb-per-s 450 --gpu-memory-gib 140 --reserve-gib 16

--teacher/--student name a model folder or its config.json; no weights are read (models are built on the meta
device). Memory and cache sizes come from the same functions as ``launch/train.py --dry-run``
(``dskd_scale.engine.dry_run``), for the three ways the teacher can be served: ``zero3`` (partitioned, gathered
every micro-batch), ``replicated`` (a full bf16 copy per GPU) and ``cache`` (hidden states read from a
``tools/cache_teacher.py`` cache; only the frozen teacher head on the GPU).

Step time is a FLOP and bandwidth model whose assumptions are flags without defaults (docs/scaling.md):
compute at --gpu-tflops x --mfu; forward 2·params·tokens, training 6·params·tokens (8· with
--gradient-checkpointing); ZeRO-3 moves, per micro-batch and GPU, (N-1)/N of the parameter bytes once for the
teacher forward and three times for the student (all-gather forward, all-gather backward, reduce-scatter of the
gradients), at the inter-node bandwidth per GPU when the run spans nodes, else the intra-node one. Attention's
sequence-quadratic FLOPs, the optimizer step, data loading and kernel launch gaps are not modelled. Printed:
a serial time (compute + communication, no overlap) and an overlapped bound (max of the two; DeepSpeed prefetches
gathers during compute), so the truth lies between them.

Exit status: 0 done, 2 bad input (a missing folder or config.json, a value out of range).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_BAD_INPUT = 2
GIB = 2**30
CACHEABLE = ("dskd", "dskd_eta", "vanilla_kd")  # the criteria a teacher cache can serve (config.run)


class PlanError(ValueError):
    """Bad input to the plan; the message names the flag."""


def load_counts(path: str, flag: str) -> dict[str, int]:
    """``parameter_counts`` (plus ``vocab_size``) of the model whose config.json ``path`` names (file or folder)."""
    from transformers import AutoConfig

    from dskd_scale.engine.dry_run import parameter_counts

    config_file = Path(path).expanduser()
    if config_file.is_dir():
        config_file = config_file / "config.json"
    if not config_file.is_file():
        raise PlanError(f"{flag} {path}: no such config.json (give a model folder or its config.json)")
    try:
        config = AutoConfig.from_pretrained(str(config_file), local_files_only=True)
        counts = parameter_counts(config)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError on a bad config
        raise PlanError(f"{flag} {config_file}: not a causal-LM config.json: {str(err).splitlines()[0]}") from err
    return {**counts, "vocab_size": counts["head_params"] // counts["hidden_size"]}


def step_time(teacher: dict[str, int], student: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per micro-batch (per GPU) for each teacher source: compute and communication, serial and overlapped."""
    tokens = args.micro_batch_size * args.seq_tokens
    rows = args.micro_batch_size * args.rows_per_example
    flops_per_s = args.gpu_tflops * 1e12 * args.mfu
    bytes_per_param = {"bf16": 2, "fp16": 2, "fp32": 4}[args.precision]
    link_bytes_per_s = args.inter_node_gbit_per_s * 1e9 / 8 if args.nodes > 1 else args.intra_node_gb_per_s * 1e9
    ring = (args.world_size - 1) / args.world_size  # share of a gathered tensor each rank receives

    def gather_s(params: int) -> float:
        return ring * params * bytes_per_param / link_bytes_per_s

    student_factor = 8 if args.gradient_checkpointing else 6
    teacher_head = teacher["head_params"]
    # DSKD v2 extra head work on the loss rows: s2t logits through the frozen teacher head (forward + input
    # gradient) and t2s logits through the student head (forward + input gradient to the projector).
    dskd_heads = (4 * teacher_head + 4 * student["head_params"]) * rows if args.criterion in ("dskd", "dskd_eta") else 0
    student_compute = (student_factor * student["total"] * tokens + dskd_heads) / flops_per_s
    student_comm = 3 * gather_s(student["total"])
    result: dict[str, Any] = {"tokens_per_micro_batch": tokens, "loss_rows_per_micro_batch": rows,
                              "compute_flop_per_s": flops_per_s, "link_bytes_per_s": link_bytes_per_s}
    for source in ("zero3", "replicated", "cache"):
        # Live: the teacher forward over every token. Cache: teacher logits from cached rows, the head only.
        teacher_flops = 2 * teacher["total"] * tokens if source != "cache" else 2 * teacher_head * rows
        teacher_compute = teacher_flops / flops_per_s
        teacher_comm = gather_s(teacher["total"]) if source == "zero3" else 0.0
        compute = teacher_compute + student_compute
        comm = teacher_comm + student_comm
        serial = compute + comm
        result[source] = {
            "teacher_compute_s": teacher_compute, "student_compute_s": student_compute,
            "teacher_comm_s": teacher_comm, "student_comm_s": student_comm,
            "serial_s": serial, "overlapped_s": max(compute, comm),
            "share_of_serial": {"teacher_compute": teacher_compute / serial,
                                "student_compute": student_compute / serial,
                                "communication": comm / serial},
        }
    return result


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report prints, as one dict (``--json``)."""
    from dskd_scale.config.run import PROJECTOR_CRITERIA, EngineConfig
    from dskd_scale.engine.dry_run import cache_plan, estimate_memory

    teacher = load_counts(args.teacher, "--teacher")
    student = load_counts(args.student, "--student")
    memory = estimate_memory(student, teacher, EngineConfig(precision=args.precision),
                             projector=args.criterion in PROJECTOR_CRITERIA, teacher_source="zero3",
                             world_size=args.world_size, nodes=args.nodes)
    examples_per_step = args.micro_batch_size * args.grad_accum * args.world_size
    steps_per_epoch = args.train_examples // examples_per_step
    if steps_per_epoch == 0:
        raise PlanError(f"--train-examples {args.train_examples}: fewer than one global batch "
                        f"({args.micro_batch_size} x {args.grad_accum} x {args.world_size} = {examples_per_step})")
    rows = args.train_examples * args.rows_per_example  # an aligned cache: one row per loss row
    cache = cache_plan(teacher["hidden_size"], {"aligned": rows, "all_positions": rows}, examples=args.train_examples,
                       micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                       world_size=args.world_size)
    del cache["size_bytes_all_positions"], cache["rows"]["all_positions"]  # given as one count here
    times = step_time(teacher, student, args)
    micro_batches_per_epoch = steps_per_epoch * args.grad_accum
    epochs: dict[str, Any] = {}
    for source in ("zero3", "replicated", "cache"):
        epochs[source] = {bound: times[source][f"{bound}_s"] * micro_batches_per_epoch
                          for bound in ("serial", "overlapped")}
    # Writing the cache (tools/cache_teacher.py): one teacher forward over the data, a full teacher on every GPU
    # (no collectives, no student), at the training micro-batch.
    writer_bytes = teacher["total"] * {"bf16": 2, "fp16": 2, "fp32": 4}[args.precision]
    build = {"seconds": times["replicated"]["teacher_compute_s"] * micro_batches_per_epoch,
             "teacher_bytes_per_gpu": writer_bytes,
             "fits": args.gpu_memory_gib is None or writer_bytes / GIB <= args.gpu_memory_gib}
    cache["read_bytes_per_s_per_gpu_at_overlapped_step"] = {
        dtype: cache["read_bytes_per_step_per_rank"][dtype] / (times["cache"]["overlapped_s"] * args.grad_accum)
        for dtype in cache["bytes_per_row"]}
    result = {
        "assumptions": {"gpu_tflops": args.gpu_tflops, "mfu": args.mfu,
                        "inter_node_gbit_per_s": args.inter_node_gbit_per_s,
                        "intra_node_gb_per_s": args.intra_node_gb_per_s, "gpu_memory_gib": args.gpu_memory_gib,
                        "reserve_gib": args.reserve_gib},
        "teacher": teacher, "student": student, "memory": memory, "teacher_cache": cache,
        "batch": {"micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
                  "global_batch_size": examples_per_step, "steps_per_epoch": steps_per_epoch,
                  "seq_tokens": args.seq_tokens, "rows_per_example": args.rows_per_example},
        "step_time_per_micro_batch": times, "epoch_s": epochs, "cache_writing": build,
    }
    states = memory["bytes_per_rank_without_activations"]
    room = None if args.gpu_memory_gib is None else args.gpu_memory_gib - args.reserve_gib
    result["fits"] = {source: room is None or states[source] / GIB <= room for source in states}
    result["choice"] = choose(result, args)
    return result


def choose(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Which teacher source to use, and why, in a few sentences (the rules of docs/scaling.md)."""
    states = result["memory"]["bytes_per_rank_without_activations"]
    fits = result["fits"]
    epochs, build = result["epoch_s"], result["cache_writing"]
    live = min((source for source in ("zero3", "replicated") if fits[source]),
               key=lambda source: epochs[source]["overlapped"], default=None)
    lines = []
    if args.gpu_memory_gib is not None:
        verdicts = ", ".join(f"{s} {'yes' if fits[s] else 'NO'} ({states[s] / GIB:.1f} GiB)" for s in states)
        lines.append(f"memory without activations fits in --gpu-memory-gib {args.gpu_memory_gib:g} - --reserve-gib "
                     f"{args.reserve_gib:g} = {args.gpu_memory_gib - args.reserve_gib:g} GiB: {verdicts}")
    if live is None:
        lines.append("no live teacher placement fits: use the cache (written on a machine where the teacher fits) "
                     "or offload the teacher partition (engine.teacher_offload_param)")
        return lines
    lines.append(f"live teacher: {live} (fits; the faster live placement by the overlapped bound)")
    if args.criterion not in CACHEABLE:
        lines.append(f"--criterion {args.criterion}: a teacher cache cannot serve it; stay with {live}")
        return lines
    if not build["fits"]:
        writer_gib = build["teacher_bytes_per_gpu"] / GIB
        lines.append(f"cache: tools/cache_teacher.py holds a full teacher per GPU ({writer_gib:.1f} GiB), more than "
                     f"--gpu-memory-gib {args.gpu_memory_gib:g}: write it on larger GPUs; stay with {live} here")
        return lines
    cost = build["seconds"]
    for bound in ("overlapped", "serial"):
        saved = epochs[live][bound] - epochs["cache"][bound]
        payoff = (f"pays off after {cost / saved:.2f} epochs" if saved > 0
                  else "never pays off (the teacher is hidden behind the student's communication)")
        lines.append(f"cache ({bound} bound): writing it costs {cost:.0f} s, saves {saved:.0f} s per epoch over "
                     f"{live}: {payoff}; with --epochs {args.epochs}: live {epochs[live][bound] * args.epochs:.0f} "
                     f"s vs cached {cost + epochs['cache'][bound] * args.epochs:.0f} s")
    return lines


def report(result: dict[str, Any]) -> str:
    """The plan as text: one section per question of docs/scaling.md."""
    t, s, memory = result["teacher"], result["student"], result["memory"]
    out = [f"teacher: {t['total'] / 1e9:.2f} B params, hidden {t['hidden_size']}, head {t['vocab_size']} x "
           f"{t['hidden_size']}",
           f"student: {s['total'] / 1e9:.2f} B params, hidden {s['hidden_size']}, head {s['vocab_size']} x "
           f"{s['hidden_size']}",
           f"ranks: {memory['world_size']} on {memory['nodes']} node(s); batch {json.dumps(result['batch'])}",
           "", "# memory per GPU without activations (GiB): DeepSpeed's ZeRO-3 model states + teacher + head copies"]
    trained = memory["trained_engine"]["accelerator_bytes_per_rank"]
    heads = memory["student_head_buffers_bytes_per_rank"]
    for source, total in memory["bytes_per_rank_without_activations"].items():
        teacher_bytes = memory["teacher_placement"][source]["bytes_per_rank"]
        out.append(f"  {source:<10} {total / GIB:8.2f} = student engine {trained / GIB:.2f} + teacher "
                   f"{teacher_bytes / GIB:.2f} + student head copy and gradients {heads / GIB:.2f}")
    cache = result["teacher_cache"]
    out += ["", "# teacher hidden-state cache (rows = examples x rows per example)",
            f"  rows {cache['rows']['aligned']:,}; bytes per row (values, int32 position, fp8's fp32 scale): "
            + ", ".join(f"{dtype} {size}" for dtype, size in cache["bytes_per_row"].items())]
    for dtype in cache["bytes_per_row"]:
        out.append(f"  {dtype}: size {cache['size_bytes'][dtype] / GIB:.2f} GiB; read per step "
                   f"{cache['read_bytes_per_step_per_rank'][dtype] / 1e6:.2f} MB per GPU, "
                   f"{cache['read_bytes_per_step_all_ranks'][dtype] / 1e9:.3f} GB all GPUs; at the overlapped "
                   f"step time {cache['read_bytes_per_s_per_gpu_at_overlapped_step'][dtype] / 1e6:.1f} MB/s per GPU")
    times = result["step_time_per_micro_batch"]
    out += ["", f"# time per micro-batch per GPU (s): {times['tokens_per_micro_batch']} tokens, "
            f"{times['loss_rows_per_micro_batch']} loss rows; compute {times['compute_flop_per_s'] / 1e12:.0f} "
            f"TFLOP/s, link {times['link_bytes_per_s'] / 1e9:.1f} GB/s",
            f"  {'source':<10} {'t.comp':>7} {'s.comp':>7} {'t.comm':>7} {'s.comm':>7} {'serial':>7} {'overlap':>7}"
            f"   serial split teacher/student/comm"]
    for source in ("zero3", "replicated", "cache"):
        row, share = times[source], times[source]["share_of_serial"]
        out.append(f"  {source:<10} {row['teacher_compute_s']:7.3f} {row['student_compute_s']:7.3f} "
                   f"{row['teacher_comm_s']:7.3f} {row['student_comm_s']:7.3f} {row['serial_s']:7.3f} "
                   f"{row['overlapped_s']:7.3f}   {share['teacher_compute']:.0%} / {share['student_compute']:.0%} / "
                   f"{share['communication']:.0%}")
    out += ["", "# epoch (s, overlapped .. serial)"]
    unfit = {source: "" if fits else "  (does not fit)" for source, fits in result["fits"].items()}
    for source, epoch in result["epoch_s"].items():
        out.append(f"  {source:<10} {epoch['overlapped']:8.0f} .. {epoch['serial']:.0f}{unfit[source]}")
    writing = result["cache_writing"]
    out.append(f"  writing the cache (tools/cache_teacher.py, a full teacher per GPU: "
               f"{writing['teacher_bytes_per_gpu'] / GIB:.2f} GiB): {writing['seconds']:.0f}"
               f"{'' if writing['fits'] else '  (does not fit)'}")
    out += ["", "# choice", *(f"  {line}" for line in result["choice"])]
    return "\n".join(out)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models and cluster")
    models.add_argument("--teacher", required=True, help="teacher model folder or its config.json")
    models.add_argument("--student", required=True, help="student model folder or its config.json")
    models.add_argument("--world-size", type=_positive(int), required=True, help="GPUs in total")
    models.add_argument("--nodes", type=_positive(int), required=True, help="nodes the GPUs are spread over")
    models.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="engine.precision")
    models.add_argument("--criterion", default="dskd",
                        choices=("dskd", "dskd_eta", "dskd_cma", "vanilla_kd", "uld", "mined"),
                        help="kd.criterion: the projector, the DSKD head work and whether a cache can serve it")
    models.add_argument("--gradient-checkpointing", action="store_true", help="student recomputes its forward")
    data = parser.add_argument_group("data and batch")
    data.add_argument("--micro-batch-size", type=_positive(int), required=True, help="examples per GPU per pass")
    data.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step")
    data.add_argument("--seq-tokens", type=_positive(int), required=True,
                      help="tokens per example (prompt + response) fed to each model")
    data.add_argument("--rows-per-example", type=_positive(int), required=True,
                      help="loss rows per example = cached rows (aligned response tokens)")
    data.add_argument("--train-examples", type=_positive(int), required=True, help="examples in the training set")
    data.add_argument("--epochs", type=_positive(int), default=1, help="epochs, for the cache's pay-off")
    assumed = parser.add_argument_group("assumptions (the time model's have no defaults: each number names its source)")
    assumed.add_argument("--gpu-tflops", type=_positive(float), required=True,
                         help="peak dense TFLOP/s per GPU at --precision (H100/H200 SXM bf16: 989)")
    assumed.add_argument("--mfu", type=_positive(float), required=True,
                         help="model FLOP utilisation reached, in (0, 1]")
    assumed.add_argument("--inter-node-gbit-per-s", type=_positive(float), required=True,
                         help="network bandwidth per GPU between nodes, one direction, Gbit/s (400: one NDR NIC "
                              "per GPU)")
    assumed.add_argument("--intra-node-gb-per-s", type=_positive(float), required=True,
                         help="bandwidth per GPU inside a node, one direction, GByte/s (450: NVLink 4, whose "
                              "900 GB/s counts both directions)")
    assumed.add_argument("--gpu-memory-gib", type=_positive(float), default=None,
                         help="usable memory per GPU, GiB (H100 80GB: about 79; H200: about 140); says what fits")
    assumed.add_argument("--reserve-gib", type=float, default=0.0,
                         help="with --gpu-memory-gib: GiB kept for what the estimate leaves out (activations, the "
                              "loss's chunk buffers, gathered layers, allocator slack)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parser.parse_args(argv)
    if args.mfu > 1:
        parser.error(f"argument --mfu: must be in (0, 1], got {args.mfu}")
    if args.world_size % args.nodes:
        parser.error(f"argument --nodes: --world-size {args.world_size} is not a multiple of --nodes {args.nodes}")
    if args.reserve_gib < 0 or (args.gpu_memory_gib is not None and args.reserve_gib >= args.gpu_memory_gib):
        parser.error(f"argument --reserve-gib: must be >= 0 and below --gpu-memory-gib, got {args.reserve_gib}")
    if args.rows_per_example > args.seq_tokens:
        parser.error(f"argument --rows-per-example: {args.rows_per_example} loss rows in {args.seq_tokens} tokens "
                     "(--seq-tokens)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = plan(args)
    except PlanError as err:
        print(f"plan_scale.py: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
