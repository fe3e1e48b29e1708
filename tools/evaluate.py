#!/usr/bin/env python
"""Evaluate a Hugging Face causal-LM folder the way the DSKD papers report it.

examples:
    python tools/evaluate.py --model DIR --suite dolly,self-inst,vicuna,gsm8k,humaneval,mbpp \\
        --data-dir DATA_DIR [--seeds 10,20,30,40,50] [--greedy] [--max-new-tokens N] [--limit N] \\
        --out results.json
    python tools/evaluate.py --config configs/eval/paper_instruction.yaml --set model=DIR --set limit=8
    torchrun --nproc_per_node 8 tools/evaluate.py ...      # data-parallel: each rank generates a disjoint shard
    python tools/evaluate.py --model runs/x/export --data-dir DATA_DIR --tensorboard runs/x/tensorboard --step 3000

Flags are shorthands for keys of ``dskd_scale.eval.config.EvalConfig``; ``--set key=value`` sets any key
(``--set sampling.top_p=0.9``, ``--set data_paths.sinst=/data/sinst/valid.jsonl``). DATA_DIR holds
<suite>/... files in the DSKD data layout (dolly/valid.jsonl, gsm8k/test.jsonl, ...). Writes ``--out`` (scores,
seeds, model path and config hash) and ``<out stem>_records/<suite>.<seed>.jsonl`` (every prompt, generation,
reference and score), and prints a suite × metric table. With ``--tensorboard DIR --step N`` the scores also go
to that TensorBoard folder (a run's ``<output_dir>/tensorboard``) as ``eval_scores/<suite>/<metric>`` at step N,
the training step of the evaluated checkpoint, beside the run's training curves.
Exit status: 0 done, 2 bad input (one line on stderr: config, data, model folder, flags).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dskd_scale.eval.config import KNOWN_SUITES, EvalConfig, SamplingConfig

    defaults = {f.name: f.default for f in fields(EvalConfig) if f.default is not MISSING}
    sampling = SamplingConfig()

    def default(key: str) -> str:
        value = defaults[key]
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with EvalConfig keys (flags and --set override it)")
    parser.add_argument("--model", help="Hugging Face model folder (teacher, baseline or exported student)")
    parser.add_argument("--tokenizer", help="tokenizer folder when the model folder has none (default: the model's)")
    parser.add_argument("--suite", help=f"comma list of {','.join(KNOWN_SUITES)} (default: {default('suites')})")
    parser.add_argument("--data-dir", help="folder with <suite>/... files (the DSKD data layout)")
    parser.add_argument("--data-path", action="append", default=[], metavar="SUITE=FILE",
                        help="data of one suite (repeatable): JSONL/JSON/Parquet/CSV file, save_to_disk folder or "
                             "hf:NAME (docs/data.md); an unknown SUITE is an instruction-following set")
    parser.add_argument("--seeds", help=f"comma list of sampling seeds (default: {default('seeds')}; one run per seed "
                                        "for sampled suites)")
    parser.add_argument("--greedy", action="store_true",
                        help=f"argmax decoding for instruction following (default: sampling, temperature "
                             f"{sampling.temperature}, top_p {sampling.top_p})")
    parser.add_argument("--max-new-tokens", type=int,
                        help="new tokens per answer, all suites (default per suite kind: instruction 256, math 256, "
                             "code 512)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each suite (default: all)")
    parser.add_argument("--batch-size", type=int,
                        help=f"prompts per generation batch (default: {default('batch_size')})")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                        help=f"model dtype (default: {default('dtype')}: the folder's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help=f"default: {default('device')} (cuda when available)")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap math/code prompts in the chat template (default: plain prompts)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="count malformed data rows instead of failing (default: fail naming file:line)")
    parser.add_argument("--allow-unsandboxed-execution", action="store_true",
                        help="humaneval/mbpp: where neither user namespaces nor root are available to contain "
                             "model-written code, run it WITHOUT containment instead of refusing (it can then read, "
                             "write and signal whatever this user can; default: refuse)")
    parser.add_argument("--out", help=f"results JSON path (default: {default('out')})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any EvalConfig key")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also write the scores to this TensorBoard folder (needs --step)")
    parser.add_argument("--step", type=int, help="--tensorboard: the training step of the evaluated checkpoint")
    args = parser.parse_args(argv)
    if args.tensorboard is not None and (args.step is None or args.step < 0):
        parser.error("--tensorboard needs --step N (N >= 0): the training step the scores belong to")
    if args.step is not None and args.tensorboard is None:
        parser.error("--step is only used with --tensorboard DIR")
    for item in args.data_path:
        suite, sep, path = item.partition("=")
        if not sep or not suite or not path:
            parser.error(f"--data-path expects SUITE=FILE, got {item!r}")
    return args


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The flags as dotted ``key=value`` overrides (values in YAML syntax), before the explicit ``--set`` ones."""
    overrides = []
    if args.model:
        overrides.append(f"model={args.model}")
    if args.suite:
        overrides.append("suites=[" + ",".join(f'"{s}"' for s in _csv(args.suite)) + "]")
    if args.seeds:
        overrides.append("seeds=[" + ",".join(_csv(args.seeds)) + "]")
    for key in ("tokenizer", "data_dir", "max_new_tokens", "limit", "batch_size", "dtype", "device", "out"):
        value = getattr(args, key)  # the flag's attribute name is the config key
        if value is not None:
            overrides.append(f"{key}={value}")
    for item in args.data_path:
        suite, _, path = item.partition("=")  # checked in parse_args
        overrides.append(f"data_paths.{suite}={path}")
    if args.greedy:
        overrides.append("sampling.greedy=true")
    if args.chat_template:
        overrides.append("use_chat_template=true")
    if args.skip_bad_rows:
        overrides.append("on_bad_row=skip")
    if args.allow_unsandboxed_execution:
        overrides.append("code_execution.allow_unsandboxed=true")
    return overrides + list(args.set)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dskd_scale.config.loader import ConfigError, load_config
    from dskd_scale.eval.config import EvalConfig
    from dskd_scale.eval.data import DataError
    from dskd_scale.eval.execution import SandboxUnavailable
    from dskd_scale.eval.runner import run_evaluation

    try:
        config = load_config(EvalConfig, args.config, overrides_from_args(args))
        results = run_evaluation(config)
    except (ConfigError, DataError, FileNotFoundError, ValueError, SandboxUnavailable) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if args.tensorboard is not None:
        from dskd_scale.eval.distributed import current_context
        from dskd_scale.tb_logging import log_eval_scores

        if current_context().is_main:
            scalars = log_eval_scores(args.tensorboard, results, args.step)
            print(f"wrote {len(scalars)} eval_scores/* scalars at step {args.step} to {args.tensorboard}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
