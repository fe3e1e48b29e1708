"""Causal LM and tokenizer building: ``from_pretrained``, a random model of a given shape, LoRA.

No deepspeed here. Under ZeRO-3 the engine keeps a ``HfDeepSpeedConfig`` alive while calling these
functions, which makes transformers build every parameter partitioned (``zero.Init``) at load time, so
no rank ever holds a full teacher. The random build uses ``from_config`` for the same reason: HF's
weight initialisation runs (``std = initializer_range``), which a bare ``zero.Init`` would skip.
"""

from __future__ import annotations

import torch
from torch import nn

from dskd_scale.config.run import LoraConfig, ModelConfig


class ModelBuildError(ValueError):
    """A model or tokenizer could not be built from its config section."""


def load_tokenizer(path: str, *, key: str = "tokenizer"):
    """A fast tokenizer from a local folder or a Hub id; the error names the config key that pointed to it."""
    from transformers import AutoTokenizer

    from dskd_scale.utils.hub import load_pretrained

    return load_pretrained(AutoTokenizer.from_pretrained, path, key=key, what="tokenizer", error_type=ModelBuildError)


def random_model_config(cfg: ModelConfig, tokenizer):
    """A transformers config for a random model of ``cfg``'s shape on ``tokenizer``'s vocabulary."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    vocab_size = len(tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if cfg.architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                          n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
                          n_inner=cfg.intermediate_size or None, **special)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[cfg.architecture]
    return config_cls(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                      intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
                      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False, **special)


def build_causal_lm(cfg: ModelConfig, tokenizer, *, dtype: torch.dtype, key: str,
                    device: torch.device | None = None) -> nn.Module:
    """Load ``cfg.path`` or build a random ``cfg.architecture`` model, in ``dtype``.

    Args:
        cfg: the ``student``/``teacher`` section.
        tokenizer: the model's tokenizer (its length sizes a random model's vocabulary).
        dtype: parameter dtype (the engine's precision).
        key: the config key, for error messages.
        device: load the weights straight onto this device (a replicated teacher: every rank holds the whole
            model, so staging it in host memory first would take ranks-per-node full copies there). None: host
            memory, or partitioned at load under a live ``HfDeepSpeedConfig``.
    """
    from transformers import AutoModelForCausalLM

    if cfg.architecture:
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(random_model_config(cfg, tokenizer), dtype=dtype)
        if device is not None:
            model = model.to(device)
    else:
        from dskd_scale.utils.hub import load_pretrained

        model = load_pretrained(AutoModelForCausalLM.from_pretrained, cfg.path, key=f"{key}.path", what="model",
                                error_type=ModelBuildError, dtype=dtype,
                                **({} if device is None else {"device_map": {"": device}}))
    if model.get_output_embeddings() is None:
        raise ModelBuildError(f"{key}: {type(model).__name__} has no output embeddings (LM head)")
    return model


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (base weights frozen, adapters trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside ``model`` (unwraps a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body (``model.model`` / ``model.transformer``) whose output is the last hidden state."""
    return causal_lm_of(model).base_model


def head_of(model: nn.Module) -> nn.Module:
    """The LM head module (``nn.Linear``, possibly weight-tied to the input embeddings)."""
    return causal_lm_of(model).get_output_embeddings()


def hidden_size_of(model: nn.Module) -> int:
    config = causal_lm_of(model).config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases take no weight decay, for every architecture (anchor bug 28).

    Decided by shape rather than by GPT-2 specific names: every 1-D parameter is a bias or a norm scale.
    ZeRO-3 partitioned parameters are flat, so their original shape is read from ``ds_shape``.
    """
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) < 2 or name.endswith(".bias")
