#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face student folder plus the projectors.

    python tools/export.py runs/x/checkpoints            OUT    (the checkpoint `latest` names)
    python tools/export.py runs/x/checkpoints/step_00000100 OUT

OUT gets config.json + model.safetensors + tokenizer files (AutoModelForCausalLM.from_pretrained(OUT) works;
LoRA adapters are merged), projectors.safetensors (t2s_projector.weight, and s2t_projector.weight for a learned
s2t map) and probe.pt (logits of the exported model on a fixed probe). One process, CPU, no launcher needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_scale.engine.checkpoint import COMPLETE_MARKER, latest_complete_tag  # noqa: E402
from dskd_scale.engine.export import export_from_checkpoint  # noqa: E402


def resolve_tag_dir(path: Path) -> Path:
    """A complete checkpoint folder: ``path`` itself, or the one ``path/latest`` names."""
    if (path / COMPLETE_MARKER).is_file():
        return path
    tag = latest_complete_tag(path)
    if tag is None:
        raise SystemExit(f"error: {path} is neither a complete checkpoint nor a folder holding one")
    return path / tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/ folder or one step_* folder in it")
    parser.add_argument("out", type=Path, help="output folder for the Hugging Face student")
    args = parser.parse_args(argv)
    tag_dir = resolve_tag_dir(args.checkpoint)
    export_from_checkpoint(tag_dir, args.out)
    print(f"exported {tag_dir} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
