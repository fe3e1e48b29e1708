#!/usr/bin/env python
"""Generate a model's responses to the prompts of a dataset (sequence-level KD data, the paper's SeqKD baseline).

examples:
    python tools/generate.py --model TEACHER_DIR --data train.jsonl --prompt-field prompt --out teacher.jsonl
    torchrun --nproc_per_node 8 tools/generate.py --model TEACHER_DIR --data train.jsonl --template alpaca \\
        --max-new-tokens 256 --out data/teacher_responses.jsonl       # data-parallel; same records as 1 process
    python tools/prealign.py --teacher-tokenizer TEACHER_DIR --student-tokenizer STUDENT_DIR \\
        --data data/teacher_responses.jsonl --out data/seqkd_aligned   # then train the student with kd.criterion=sft

Prompts are rendered from the rows exactly as tools/prealign.py renders them (--prompt-field, --template,
--chat-template model|FILE; docs/data.md). Decoding samples at temperature 1 by default (--greedy for argmax);
sampling noise is keyed by (seed, example, sample), so the records do not depend on the number of processes or the
batch size. Output: JSON lines {"prompt", "output", "example_index", "generation": {model, sample, source, finish,
new_tokens, prompt_truncated}} that tools/prealign.py reads with its defaults, plus OUT.manifest.json (settings,
counts, sha256). Re-running the same command resumes: finished blocks under OUT.parts/ are kept.
Runs under torchrun, the deepspeed launcher or srun (one task per rank, with MASTER_ADDR/MASTER_PORT exported).
Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder that generates (the teacher)")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder when the model folder has none")
    parser.add_argument("--data", action="append", required=True,
                        help="data source (repeatable): JSONL/JSON/Parquet/CSV file, save_to_disk folder or hf:NAME")
    parser.add_argument("--out", required=True, help="output JSON-lines file")
    parser.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default: prompt)")
    parser.add_argument("--template", help="prompt template with named {fields}: 'alpaca', a file, or the text")
    parser.add_argument("--chat-template", help="render `messages` rows: 'model' (the tokenizer's own) or a Jinja "
                                                "file; a trailing assistant message (the gold reply) is left out")
    parser.add_argument("--messages-field", default="messages", help="field holding chat messages")
    parser.add_argument("--ignore-fields", default="", help="comma-separated fields a template leaves out on purpose")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0, off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0, off)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="(default: 0, off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="(default: 256)")
    parser.add_argument("--max-prompt-tokens", type=int, default=0,
                        help="longer prompts are cut from the left (default: 0, the model's context window minus "
                             "--max-new-tokens)")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=10, help="sampling seed (default: 10)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows (default: 0, all)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--block-examples", type=int, default=512,
                        help="examples per resumable block (default: 512)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="count and skip rows without a usable prompt")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="(default: auto: bf16 on a GPU that has it, else fp32)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dskd_scale.prealign.prompts import PromptFormat
    from dskd_scale.response_data import GenerateConfig, GenerateError, generate_responses

    # "student" is the renderer's name for the generating model's own chat template
    chat_template = "student" if args.chat_template == "model" else args.chat_template
    prompt = PromptFormat(prompt_field=args.prompt_field, template=args.template, chat_template=chat_template,
                          messages_field=args.messages_field,
                          ignore_fields=tuple(f.strip() for f in args.ignore_fields.split(",") if f.strip()))
    config = GenerateConfig(
        model=args.model, tokenizer=args.tokenizer, data=tuple(args.data), out=args.out, prompt=prompt,
        greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        no_repeat_ngram_size=args.no_repeat_ngram_size, max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens, samples_per_prompt=args.samples_per_prompt, seed=args.seed,
        limit=args.limit, batch_size=args.batch_size, block_examples=args.block_examples,
        skip_bad_rows=args.skip_bad_rows, dtype=args.dtype, device=args.device)
    try:
        summary = generate_responses(config)
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary:
        print(f"wrote {summary['records']} records to {args.out} (finish {summary['finish']}, "
              f"{summary['empty_responses']} empty, dropped rows {summary['dropped_rows'] or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
