#!/usr/bin/env python
"""Prealign instruction data for cross-tokenizer DSKD: Parquet shards + manifest.json (docs/design.md, Contract 1).

Single process (local cores via --workers):
    python tools/prealign.py --teacher-tokenizer T --student-tokenizer S --data train.jsonl \\
        --prompt-field prompt --response-field output --max-length 512 --num-shards 8 --out data/prealigned
Several processes or nodes (each rank writes its own shards; the result is byte-identical):
    mpiexec -n 4 python tools/prealign.py ...          srun --mpi=pmi2 python tools/prealign.py ...
Settings can also come from YAML (--config FILE; flags given on the command line win).

Data (--data, repeatable): JSON-lines files (.jsonl, .jsonl.gz), .json/.parquet/.csv/.tsv files, datasets'
save_to_disk folders (DIR or DIR?split=NAME) and Hub datasets (hf:NAME[?split=train&config=C&revision=R]); the
last two go through `datasets` and its cache. Tokenizers are folders or Hub ids. Prompt formats (docs/data.md):
  fields    --prompt-field prompt --response-field output (default): two fields, used as they are;
  template  --template alpaca | --template FILE | --template "Question: {question}\\nAnswer: " with named {fields};
  chat      --chat-template student|teacher|FILE.jinja: rows hold `messages` [{role, content}, ...], the last one
            the assistant's reply; the earlier ones are rendered by that ONE chat template for both tokenizers.
A response given as a list (Dolly's multi-reference `output`) trains on its first element. Text fields no prompt
uses are an error with --template and a warning (counted in the manifest) otherwise; --ignore-fields silences them.
Bad rows stop the run with file:line (or "file row N") unless --skip-bad-rows, which counts them instead.
Empty responses are always dropped and counted. Over-long examples: the prompt is cut from the left at a
character position both tokenizers respect; if the response alone is too long, the prompt is dropped and the
response cut from the right (no EOS). Alignment (--whitespace): `exact` pairs tokens covering identical bytes;
`paper` also pairs a word whose leading space is a token of its own on one side with the word carrying the space
on the other (the paper's ETA); the choice is recorded in manifest.json ("alignment") and the report shows both.
Re-running the same command skips complete, checksum-valid shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dskd_scale.data.format import ShardFormatError  # noqa: E402
from dskd_scale.prealign.pipeline import PrealignConfig, PrealignError, run_prealign  # noqa: E402
from dskd_scale.prealign.process_group import available_cores, detect_process_group, local_process_count  # noqa: E402
from dskd_scale.prealign.sources import PrealignInputError  # noqa: E402

_DEFAULTS = {"prompt_field": "prompt", "response_field": "output", "template": None, "chat_template": None,
             "messages_field": "messages", "ignore_fields": (), "max_length": 512, "num_shards": 1,
             "skip_bad_rows": False, "chunk_examples": 64, "report_examples": 5, "whitespace": "exact"}
_REQUIRED = ("teacher_tokenizer", "student_tokenizer", "data", "out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with any of the settings below (snake_case keys)")
    parser.add_argument("--teacher-tokenizer", help="tokenizer folder or Hub id of the teacher")
    parser.add_argument("--student-tokenizer", help="tokenizer folder or Hub id of the student")
    parser.add_argument("--data", action="append",
                        help="data file, save_to_disk folder or hf:NAME (repeat for several; see above)")
    parser.add_argument("--prompt-field", help="field holding the prompt text (default: prompt)")
    parser.add_argument("--response-field", help="field holding the response text or list (default: output)")
    parser.add_argument("--template", help="prompt template with named {fields}: 'alpaca', a file, or the text")
    parser.add_argument("--chat-template", help="render `messages` rows with the student's or teacher's chat "
                                                "template, or a Jinja file")
    parser.add_argument("--messages-field", help="field holding the chat messages (default: messages)")
    parser.add_argument("--ignore-fields", help="comma-separated text fields to leave out of the prompt on purpose")
    parser.add_argument("--max-length", type=int, help="max tokens per side, BOS and EOS included (default: 512)")
    parser.add_argument("--num-shards", type=int, help="number of output shards (default: 1)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--skip-bad-rows", action="store_true", default=None,
                        help="count and skip malformed/missing/non-string rows instead of stopping")
    parser.add_argument("--workers", type=int, help="local worker processes per rank (default: free cores / ranks)")
    parser.add_argument("--chunk-examples", type=int, help="examples per worker task (default: 64)")
    parser.add_argument("--report-examples", type=int, help="worst examples kept for the report (default: 5)")
    parser.add_argument("--whitespace", choices=("exact", "paper"),
                        help="exact (default): pair tokens with identical byte spans; paper: identical once each "
                             "token's leading spaces (the 'Ġ'/'▁' word marker) are removed, as the DSKD paper's ETA")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> PrealignConfig:
    """Merge defaults < YAML < flags; every problem is reported at once, naming the flag or YAML key."""
    settings = dict(_DEFAULTS)
    loaded: dict = {}
    if args.config is not None:
        import yaml

        try:
            loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise PrealignInputError(f"{args.config}: cannot read YAML ({error})") from error
        if not isinstance(loaded, dict):
            raise PrealignInputError(f"{args.config}: expected a mapping of settings")
        known = set(_DEFAULTS) | set(_REQUIRED) | {"workers"}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise PrealignInputError(f"{args.config}: unknown keys {unknown} (known: {sorted(known)})")
        settings.update(loaded)
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            settings[key] = value
    given = {key for key, value in vars(args).items() if value is not None} | set(loaded)
    unused = [key for key in ("prompt_field",) if key in given and (settings["template"] or settings["chat_template"])]
    unused += ["response_field"] * ("response_field" in given and bool(settings["chat_template"]))
    if unused:
        raise PrealignInputError(f"--{unused[0].replace('_', '-')} is not used with --template/--chat-template "
                                 "(a template names its fields; a chat row's response is its last message)")
    if args.template is not None:  # a shell gives "\\n" as two characters; a template on the command line means newline
        settings["template"] = args.template.replace("\\n", "\n").replace("\\t", "\t")
    if isinstance(settings.get("ignore_fields"), str):
        settings["ignore_fields"] = [name.strip() for name in settings["ignore_fields"].split(",") if name.strip()]
    settings["ignore_fields"] = tuple(settings["ignore_fields"])
    if isinstance(settings.get("data"), str):
        settings["data"] = [settings["data"]]
    missing = [key for key in _REQUIRED if not settings.get(key)]
    if missing:
        raise PrealignInputError("missing settings: " + ", ".join("--" + key.replace("_", "-") for key in missing))
    if settings.get("workers") is None:
        settings["workers"] = max(1, available_cores() // local_process_count())
    settings["data"] = tuple(str(path) for path in settings["data"])
    return PrealignConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    try:
        config = build_config(parse_args(argv))
        group = detect_process_group()
        run_prealign(config, group)
    except (PrealignInputError, PrealignError, ShardFormatError, RuntimeError) as error:
        print(f"prealign: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
