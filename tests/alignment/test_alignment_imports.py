"""`import dskd_scale.alignment` stays light: numpy only, tokenizer objects are passed in."""

from __future__ import annotations


def test_package_imports_neither_transformers_nor_torch_nor_deepspeed(project_root):
    import subprocess
    import sys

    probe = (
        "import sys, dskd_scale.alignment; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torch', 'deepspeed'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=project_root)
    assert result.stdout.strip() == "[]"
