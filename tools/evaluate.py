#!/usr/bin/env python
"""Evaluate a Hugging Face causal-LM folder the way the DSKD papers report it.

    python tools/evaluate.py --model DIR --suite dolly,self-inst,vicuna,gsm8k,humaneval,mbpp \\
        --data-dir ../shared/assets/data [--seeds 10,20,30,40,50] [--greedy] [--max-new-tokens N] [--limit N] \\
        --out results.json
    python tools/evaluate.py --config configs/eval/paper_instruction.yaml --set model=DIR --set limit=8
    torchrun --nproc_per_node 8 tools/evaluate.py ...      # data-parallel: each rank generates a disjoint shard

Flags are shorthands for keys of ``dskd_scale.eval.config.EvalConfig``; ``--set key=value`` sets any key
(``--set sampling.top_p=0.9``, ``--set data_paths.sinst=/data/sinst/valid.jsonl``). Writes ``--out`` (scores,
seeds, model path and config hash) and ``<out stem>_records/<suite>.<seed>.jsonl`` (every prompt, generation,
reference and score), and prints a suite × metric table.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with EvalConfig keys (flags and --set override it)")
    parser.add_argument("--model", help="Hugging Face model folder (teacher, baseline or exported student)")
    parser.add_argument("--tokenizer", help="tokenizer folder when the model folder has none")
    parser.add_argument("--suite", help="comma list: dolly,self-inst,vicuna,sinst,uinst,gsm8k,humaneval,mbpp")
    parser.add_argument("--data-dir", help="folder with <suite>/... files (the DSKD data layout)")
    parser.add_argument("--data-path", action="append", default=[], metavar="SUITE=FILE",
                        help="data file of one suite (repeatable); an unknown SUITE is an instruction-following set")
    parser.add_argument("--seeds", help="comma list of sampling seeds (default 10,20,30,40,50)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding for instruction following")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each suite")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--chat-template", action="store_true", help="wrap math/code prompts in the chat template")
    parser.add_argument("--skip-bad-rows", action="store_true", help="count malformed data rows instead of failing")
    parser.add_argument("--out", help="results JSON path (default results.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any EvalConfig key")
    return parser.parse_args(argv)


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
        suite, sep, path = item.partition("=")
        if not sep or not suite or not path:
            raise SystemExit(f"--data-path expects SUITE=FILE, got {item!r}")
        overrides.append(f"data_paths.{suite}={path}")
    if args.greedy:
        overrides.append("sampling.greedy=true")
    if args.chat_template:
        overrides.append("use_chat_template=true")
    if args.skip_bad_rows:
        overrides.append("on_bad_row=skip")
    return overrides + list(args.set)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dskd_scale.config.loader import ConfigError, load_config
    from dskd_scale.eval.config import EvalConfig
    from dskd_scale.eval.data import DataError
    from dskd_scale.eval.runner import run_evaluation

    try:
        config = load_config(EvalConfig, args.config, overrides_from_args(args))
        run_evaluation(config)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
