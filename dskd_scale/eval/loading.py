"""Load a Hugging Face causal-LM folder for evaluation (a teacher, a baseline, or an exported student)."""

from __future__ import annotations

from pathlib import Path

import torch

from dskd_scale.eval.distributed import DistContext
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token if it has none, and pad on the left; returns what was done.

    Reusing EOS (or UNK) as padding is safe here: prompts are left-padded with an explicit attention mask, and
    generated EOS is detected by id before padding could be confused with it. No token is added, so the
    embedding matrix never needs resizing.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None:
        return "kept"
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            return f"set to {name} {token!r}"
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path} has no pad, eos or unk token; add a pad token to its tokenizer_config.json"
    )


def resolve_device(device: str, context: DistContext) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but CUDA is not available")
        return torch.device("cuda", context.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise (fp16 has no CPU kernels for generation)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("dtype fp16 is not supported on CPU; use fp32 or bf16")
    return _DTYPES[dtype]


def load_model_and_tokenizer(model_dir: str | Path, *, tokenizer_dir: str | Path | None = None, dtype: str = "auto",
                             device: str = "auto", context: DistContext | None = None):
    """(model in eval mode on its device, tokenizer with a pad token, notes) for a Hugging Face model folder or a
    Hub id (``utils.hub``: through the local Hub cache when offline).

    The tokenizer is read from ``tokenizer_dir`` when given, else from the model folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_scale.utils.hub import is_hub_id, load_pretrained

    model_name = str(model_dir)
    from_hub = is_hub_id(model_name)
    model_dir = Path(model_dir)
    if not from_hub:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    context = context or DistContext(0, 1, 0)
    torch_device = resolve_device(device, context)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer_name = str(tokenizer_dir) if tokenizer_dir else model_name
    if not is_hub_id(tokenizer_name):
        tokenizer_path = Path(tokenizer_name)
        # Checked up front: given a folder without tokenizer files, AutoTokenizer may fall back to a cached tokenizer
        # of the same model type, and the evaluation would silently use the wrong vocabulary.
        if not any((tokenizer_path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tokenizer_path}; "
                "give the tokenizer folder with --tokenizer (config key 'tokenizer')"
            )
    try:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer_name, key="tokenizer", what="tokenizer",
                                    error_type=FileNotFoundError)
    except FileNotFoundError:
        raise  # load_pretrained's own message (a Hub id that could not be had) says what to do
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load a tokenizer from {tokenizer_name} ({type(err).__name__}: {str(err)[:200]}); "
            "give the tokenizer folder with --tokenizer (config key 'tokenizer')"
        ) from err
    pad_note = ensure_pad_token(tokenizer)
    if pad_note != "kept":
        log.info("tokenizer of %s has no pad token: %s", model_name, pad_note)
    try:
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, model_name, key="model", what="model",
                                error_type=FileNotFoundError, dtype=torch_dtype)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise FileNotFoundError(f"cannot load model weights from {model_name}: {str(err)[:300]}") from err
    model = model.to(torch_device).eval()
    notes = {"pad_token": pad_note, "dtype": str(torch_dtype).removeprefix("torch."), "device": str(torch_device)}
    return model, tokenizer, notes


def context_window(model) -> int | None:
    """The model's maximum sequence length from its config, when it declares one."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
