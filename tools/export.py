#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face student folder plus the projectors.

    python tools/export.py runs/x/checkpoints OUT                     (the checkpoint `latest` names)
    python tools/export.py runs/x/checkpoints/step_00000100 OUT --dtype bf16

OUT gets config.json + model.safetensors + tokenizer files (AutoModelForCausalLM.from_pretrained(OUT) works;
LoRA adapters are merged), projectors.safetensors (t2s_projector.weight, and s2t_projector.weight for a learned
s2t map) and probe.pt (logits of the exported model on a fixed probe). One process, CPU, no launcher needed.

--dtype: the weights are stored as fp32 masters in the checkpoint; the export rounds them once to the dtype
asked for. Default: the run's engine.precision (bf16 for the GPU recipes, as the in-run export writes it);
a 1.5B-parameter student is 3 GB in bf16/fp16 and 6 GB in fp32.
Exit status: 0 done, 2 bad input (one line on stderr: no checkpoint there, a config or weights that do not
match, an unwritable OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    pass


def resolve_tag_dir(path: Path) -> Path:
    """A complete checkpoint folder whose files match its COMPLETE list: ``path`` itself, or the newest in ``path``."""
    from dskd_scale.engine.checkpoint import COMPLETE_MARKER, latest_complete_tag, verify

    if (path / COMPLETE_MARKER).is_file():
        problem = verify(path)
        if problem is not None:
            raise BadInput(f"{path} is not a usable checkpoint: {problem}")
        return path
    if not path.is_dir():
        raise BadInput(f"{path} does not exist or is not a folder")
    tag = latest_complete_tag(path)
    if tag is None:
        raise BadInput(f"{path} is neither a complete checkpoint (no {COMPLETE_MARKER} file) nor a folder holding "
                       "one (no step_* folder with a COMPLETE file whose files are all there)")
    return path / tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/ folder or one step_* folder in it")
    parser.add_argument("out", type=Path, help="output folder for the Hugging Face student")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="dtype of the saved weights and projectors (default: the run's engine.precision)")
    args = parser.parse_args(argv)
    from dskd_scale.config.loader import ConfigError
    from dskd_scale.engine.export import export_from_checkpoint

    try:
        tag_dir = resolve_tag_dir(args.checkpoint)
        dtype = export_from_checkpoint(tag_dir, args.out, dtype=args.dtype)
    except (BadInput, ConfigError, ValueError, OSError) as err:  # ModelBuildError is a ValueError
        print(f"export.py: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {tag_dir} -> {args.out} ({dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
