"""Sequence-level KD data: a model's (usually the teacher's) responses to the prompts of a dataset.

``tools/generate.py`` drives this; the paper's SeqKD baseline is student SFT on the result. Prompts are rendered
from rows exactly as prealignment renders them (``dskd_scale.prealign.prompts``: fields, templates, chat
messages) and generated data-parallel with the evaluation's generation code: batches are planned globally and
sampling noise is keyed by (seed, example, sample), so a record depends only on the model, the prompt, its index
and the seed, never on the world size or the batching. The output is JSON lines with ``prompt`` and ``output``
fields, which ``tools/prealign.py`` reads with its defaults.

Resumable and crash-safe: examples are processed in blocks of ``block_examples``; each finished block is written
atomically to ``<out>.parts/block-NNNNN.jsonl`` and a rerun with the same settings skips the finished blocks. The
settings live in ``<out>.parts/settings.json``; a rerun with other settings is refused and the error names the
keys that differ. When every block is done, the parts are joined into ``<out>`` (atomically) and
``<out>.manifest.json`` records the settings, the counts (finish reasons, empty responses, dropped rows) and the
output's sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dskd_scale.data.format import atomic_write_bytes, remove_stale_temporaries
from dskd_scale.eval.config import SamplingConfig
from dskd_scale.eval.distributed import DistContext, barrier, gather_records, init_from_env
from dskd_scale.eval.generation import generate_shard
from dskd_scale.eval.loading import context_window, load_model_and_tokenizer
from dskd_scale.prealign.prompts import PromptFormat, PromptFormatError, RowError, RowRenderer, chat_renderer
from dskd_scale.prealign.sources import SourceFile, scan_sources
from dskd_scale.utils.data_sources import DataSourceError, MalformedRow, iter_rows, parse_spec
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)
FORMAT = "dskd_scale.responses"
FORMAT_VERSION = 1
# Settings that say where things run or live, not what is generated: a resume may change them.
_NOT_CONTENT = ("out", "batch_size", "device", "skip_bad_rows", "block_examples")


class GenerateError(ValueError):
    """Bad settings or data; the message names the option, file:line or row."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateConfig:
    """What to generate. ``prompt`` renders rows exactly as prealignment does; its ``chat_template`` ``student``
    means the generating model's own template (there is one model here)."""

    model: str
    data: tuple[str, ...]
    out: str
    tokenizer: str = ""
    prompt: PromptFormat = PromptFormat()
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 0  # 0: the model's context window minus max_new_tokens
    samples_per_prompt: int = 1
    seed: int = 10
    limit: int = 0
    batch_size: int = 8
    block_examples: int = 512
    skip_bad_rows: bool = False
    dtype: str = "auto"
    device: str = "auto"

    def problems(self) -> list[str]:
        problems = []
        if not self.data:
            problems.append("--data: give at least one data source")
        for name in ("max_new_tokens", "samples_per_prompt", "batch_size", "block_examples"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.limit < 0 or self.max_prompt_tokens < 0:
            problems.append(f"--limit and --max-prompt-tokens must be >= 0 (0: all rows / the context window), got "
                            f"{self.limit}, {self.max_prompt_tokens}")
        if self.greedy and self.samples_per_prompt > 1:
            problems.append("--samples-per-prompt > 1 needs sampling: greedy decoding repeats the same response")
        problems += [f"sampling: {problem}" for problem in self.sampling().validate()]
        try:
            problems += [f"prompt format: {problem}" for problem in self.prompt.problems()]
        except PromptFormatError as error:
            problems.append(f"prompt format: {error}")
        return problems

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(greedy=self.greedy, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)

    def content_settings(self) -> dict[str, Any]:
        """The settings a finished block depends on (resuming with other values is refused)."""
        settings = asdict(self)
        for name in _NOT_CONTENT:
            settings.pop(name)
        settings["data"] = list(self.data)
        settings["prompt"] = self.prompt.manifest_entry()
        return settings


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.parts")


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.manifest.json")


def _block_file(parts: Path, block: int) -> Path:
    return parts / f"block-{block:05d}.jsonl"


def _check_settings(parts: Path, settings: dict[str, Any], sources: list[SourceFile]) -> None:
    """Record the settings, or refuse to resume finished blocks made with other settings or other data."""
    recorded = {"settings": settings, "sources": [source.as_manifest()
                                                  for source in sources]}
    file = parts / "settings.json"
    if file.is_file():
        previous = json.loads(file.read_text())
        changed = sorted(key for key in set(previous["settings"]) | set(settings)
                         if previous["settings"].get(key) != settings.get(key))
        if previous["sources"] != recorded["sources"]:
            changed.append("data (a source file changed)")
        if changed:
            raise GenerateError(f"{parts} holds blocks generated with other settings ({', '.join(changed)}); "
                                f"use another --out, or delete {parts} to start over")
        return
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, json.dumps(recorded, indent=2).encode())


def _read_prompts(sources: list[SourceFile], start: int, stop: int, renderer: RowRenderer, skip_bad_rows: bool,
                  drops: Counter) -> list[tuple[int, str, str]]:
    """(example index, location, prompt) of the rows with index in [start, stop); bad rows raise or are counted."""
    prompts = []
    for source in sources:
        if source.first_index >= stop or source.first_index + source.rows <= start:
            continue
        wanted = lambda local, first=source.first_index: start <= first + local < stop  # noqa: E731
        for local, location, row in iter_rows(parse_spec(source.path), wanted, expected_rows=source.rows):
            try:
                if isinstance(row, MalformedRow):
                    raise RowError("malformed_json", row.message)
                prompts.append((source.first_index + local, location, renderer.render_prompt(row, location)))
            except RowError as error:
                if not skip_bad_rows:
                    raise GenerateError(f"{error} (pass --skip-bad-rows to count and skip such rows)") from error
                drops[error.reason] += 1
    return prompts


def _generate_block(model, tokenizer, config: GenerateConfig, max_prompt_tokens: int,
                    prompts: list[tuple[int, str, str]], context: DistContext, model_name: str) -> list[dict[str, Any]]:
    samples = config.samples_per_prompt
    texts = [prompt for _, _, prompt in prompts for _ in range(samples)]
    keys = [index * samples + sample for index, _, _ in prompts for sample in range(samples)]
    outputs = generate_shard(model, tokenizer, texts, keys, sampling=config.sampling(), seed=config.seed,
                             max_new_tokens=config.max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                             batch_size=config.batch_size, context=context, desc="generate")
    records = []
    for position, generation in outputs.items():
        index, location, prompt = prompts[position // samples]
        records.append({"position": position, "prompt": prompt, "output": generation.text, "example_index": index,
                        "generation": {"model": model_name, "sample": position % samples, "source": location,
                                       "finish": generation.finish, "new_tokens": generation.new_tokens,
                                       "prompt_truncated": generation.prompt_truncated}})
    return gather_records(records, context)


def _join_parts(config: GenerateConfig, parts: Path, blocks: int, drops: Counter) -> dict[str, Any]:
    """Concatenate the blocks into ``out`` and write the manifest (rank 0)."""
    finish, empty, records, truncated = Counter(), 0, 0, 0
    chunks = []
    for block in range(blocks):
        data = _block_file(parts, block).read_bytes()
        chunks.append(data)
        for line in data.splitlines():
            record = json.loads(line)
            records += 1
            finish[record["generation"]["finish"]] += 1
            empty += not record["output"].strip()
            truncated += record["generation"]["prompt_truncated"]
    joined = b"".join(chunks)
    atomic_write_bytes(config.out, joined)
    summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": config.content_settings(),
               "records": records, "finish": dict(sorted(finish.items())), "empty_responses": empty,
               "prompts_truncated": truncated, "dropped_rows": dict(sorted(drops.items())),
               "sha256": hashlib.sha256(joined).hexdigest()}
    atomic_write_bytes(manifest_path(config.out), json.dumps(summary, indent=2).encode())
    return summary


def generate_responses(config: GenerateConfig) -> dict[str, Any]:
    """Generate (or finish generating) ``config.out``; collective under a launcher. Returns the manifest."""
    problems = config.problems()
    if problems:
        raise GenerateError("invalid settings:\n  " + "\n  ".join(problems))
    context = init_from_env()
    try:
        sources = scan_sources(config.data)
    except ValueError as error:  # PrealignInputError / DataSourceError name the source
        raise GenerateError(str(error)) from error
    total = sum(source.rows for source in sources)
    if config.limit:
        total = min(total, config.limit)
    try:
        model, tokenizer, _ = load_model_and_tokenizer(config.model, tokenizer_dir=config.tokenizer or None,
                                                       dtype=config.dtype, device=config.device, context=context)
    except (FileNotFoundError, ValueError) as error:
        raise GenerateError(f"--model {config.model}: {error}") from error
    window = context_window(model)
    max_prompt_tokens = config.max_prompt_tokens
    if not max_prompt_tokens:
        if window is None:
            raise GenerateError(f"--model {config.model}: its config declares no context window; set "
                                "--max-prompt-tokens")
        max_prompt_tokens = window - config.max_new_tokens
    if max_prompt_tokens <= 0 or (window is not None and max_prompt_tokens + config.max_new_tokens > window):
        raise GenerateError(f"--max-prompt-tokens ({max_prompt_tokens}) + --max-new-tokens "
                            f"({config.max_new_tokens}) must fit the model's context window ({window})")
    prompt_format = config.prompt
    renderer = RowRenderer(prompt_format)
    if prompt_format.kind == "chat":
        try:
            renderer = RowRenderer(prompt_format, chat_renderer(tokenizer, prompt_format.chat_template))
        except PromptFormatError as error:
            raise GenerateError(f"--chat-template: {error}") from error

    parts = parts_dir(config.out)
    if context.is_main:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        _check_settings(parts, config.content_settings(), sources)
        for block in range(-(-total // config.block_examples)):
            remove_stale_temporaries(_block_file(parts, block))
    barrier(context)
    blocks = -(-total // config.block_examples)
    drops: Counter = Counter()
    model_name = str(config.model)
    for block in range(blocks):
        start, stop = block * config.block_examples, min((block + 1) * config.block_examples, total)
        try:
            prompts = _read_prompts(sources, start, stop, renderer, config.skip_bad_rows, drops)
        except DataSourceError as error:
            raise GenerateError(str(error)) from error
        target = _block_file(parts, block)
        if target.is_file():
            continue  # finished by an earlier run (its drops were counted again above, so the total stays right)
        records = (_generate_block(model, tokenizer, config, max_prompt_tokens, prompts, context, model_name)
                   if prompts else [])
        if context.is_main:
            lines = [json.dumps({k: v for k, v in record.items() if k != "position"}, ensure_ascii=False)
                     for record in records]
            atomic_write_bytes(target, "".join(line + "\n" for line in lines).encode())
            log.info("block %d/%d: %d records", block + 1, blocks, len(records))
        barrier(context)
    summary = _join_parts(config, parts, blocks, drops) if context.is_main else {}
    barrier(context)
    return summary
