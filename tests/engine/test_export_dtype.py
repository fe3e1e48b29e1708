"""tools/export.py --dtype: the saved safetensors hold that dtype, round the fp32 masters once, and reload.

One 1-rank ZeRO-3 run (fp32, 1 step, one checkpoint) is exported three ways: default (the run's precision),
bf16 and fp16.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import PROJECT_ROOT, check, demo_overrides, launch

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_dtype")
    overrides = demo_overrides(demo, same_vocab=False, output_dir=out) + [
        "optim.max_steps=1", "optim.warmup_steps=0", "checkpoint.every_steps=1", "checkpoint.export_at_end=false",
        "log.tensorboard=false"]
    check(launch("configs/tests/tiny_dskd_eta.yaml", overrides, ranks=1, port=29562))
    return out / "checkpoints"


def export(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "export.py"), str(checkpoint), str(out),
                           *extra], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240)


def stored_dtypes(path: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {tensor.dtype for tensor in load_file(path).values()}


@pytest.fixture(scope="module")
def fp32_export(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "export"
    result = export(checkpoint, out)  # default: the run's engine.precision, fp32 here
    check(result)
    assert "(fp32)" in result.stdout
    return out


def test_default_export_keeps_the_run_precision(fp32_export) -> None:
    assert stored_dtypes(fp32_export / "model.safetensors") == {torch.float32}
    assert stored_dtypes(fp32_export / "projectors.safetensors") == {torch.float32}


@pytest.mark.parametrize(("flag", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_flag_rounds_the_fp32_weights_once_and_the_folder_reloads(checkpoint, fp32_export, tmp_path, flag,
                                                                        dtype) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    check(export(checkpoint, out, "--dtype", flag))
    for name in ("model.safetensors", "projectors.safetensors"):
        assert stored_dtypes(out / name) == {dtype}, name
        full, rounded = load_file(fp32_export / name), load_file(out / name)
        assert sorted(full) == sorted(rounded)
        for key, value in full.items():
            assert torch.equal(rounded[key], value.to(dtype)), key  # one rounding of the fp32 master weights
    # Half the bytes of the fp32 export (plus the same small header).
    ratio = (out / "model.safetensors").stat().st_size / (fp32_export / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert model.dtype == dtype
    probe = torch.load(out / "probe.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    # Same weights, same kernels: the probe written at export time is reproduced; the bound allows a different
    # kernel choice at reload (a few units of the dtype's epsilon relative to the logits' scale).
    scale = float(probe["logits"].abs().max())
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=4 * torch.finfo(dtype).eps * max(scale, 1.0))


def test_unknown_dtype_is_a_usage_error(checkpoint, tmp_path) -> None:
    result = export(checkpoint, tmp_path / "x", "--dtype", "int8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--dtype" in result.stderr and not (tmp_path / "x").exists()
