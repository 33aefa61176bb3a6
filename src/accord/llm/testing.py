"""Tiny random models for tests and examples (needs ``transformers``): Llama-family ones for the
symmetries (:func:`tiny_model`), and tiny configs of other classes for the tensor-wise merges
(:func:`tiny_any_model`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}

# The sizes of the tiny decoders (:func:`tiny_config`, :data:`TENSORWISE_VARIANTS`).
_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}

# Named tiny configurations covering the attention layouts and options alignment must handle:
# (family, tiny_config overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {}),
    "llama-all-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"hidden_size": 64, "head_dim": 16}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1, "hidden_size": 48, "head_dim": 12}),
}


def tiny_config(family: str = "llama", **overrides: Any) -> Any:
    """A small config of ``family`` (llama, mistral, qwen2): hidden 32, 2 layers, 4 query heads
    in 2 key/value groups, head dim 8, SwiGLU width 48, vocabulary 100; ``overrides`` win."""
    import transformers

    sizes = {**_DECODER, "head_dim": 8, "tie_word_embeddings": False, **overrides}
    return getattr(transformers, _CLASSES[family][0])(**sizes)


def tiny_model(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """A :func:`tiny_config` model in eval mode whose every parameter (norm gains and biases
    too, which Hugging Face initialises to 1 and 0) has random noise added, so that no
    symmetry is hidden by a constant tensor."""
    return _perturbed(_CLASSES[family][1], tiny_config(family, **overrides), seed, dtype)


def _perturbed(architecture: str, config: Any, seed: int, dtype: torch.dtype) -> nn.Module:
    """Transformers' ``architecture`` of ``config`` initialised from ``seed``, with noise added
    to every parameter, in ``dtype`` and eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.to(dtype).eval()


# Tiny configurations of classes accord merges tensor by tensor without a symmetry table:
# architecture -> (config class, sizes). Their tensors cover what such merges must handle: tied
# embeddings (GPT-2, Gemma), fused projections (Phi-3), experts (Mixtral), q/k norms (Qwen3,
# OLMo 2), encoders with classifier heads (BERT, ViT).
_ENCODER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
TENSORWISE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "GPT2LMHeadModel": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64},
    ),
    "Qwen3ForCausalLM": ("Qwen3Config", {**_DECODER, "head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**_DECODER, "head_dim": 8}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {**_DECODER, "head_dim": 8}),
    "Phi3ForCausalLM": ("Phi3Config", {**_DECODER, "pad_token_id": 0}),
    "Olmo2ForCausalLM": ("Olmo2Config", {**_DECODER, "pad_token_id": 0}),
    "MixtralForCausalLM": (
        "MixtralConfig",
        {**_DECODER, "head_dim": 8, "num_local_experts": 3, "num_experts_per_tok": 2},
    ),
    "BertForSequenceClassification": (
        "BertConfig",
        {**_ENCODER, "num_attention_heads": 4, "vocab_size": 100, "num_labels": 3},
    ),
    "ViTForImageClassification": (
        "ViTConfig",
        {**_ENCODER, "num_attention_heads": 4, "image_size": 16, "patch_size": 8, "num_labels": 3},
    ),
}


def tiny_any_model(
    architecture: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """A tiny ``architecture`` model (a key of :data:`TENSORWISE_VARIANTS`) in eval mode, every
    parameter perturbed by noise as in :func:`tiny_model`; ``overrides`` win over the sizes."""
    import transformers

    config_class, sizes = TENSORWISE_VARIANTS[architecture]
    config = getattr(transformers, config_class)(**{**sizes, **overrides})
    return _perturbed(architecture, config, seed, dtype)


def tiny_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch ``model`` takes: pixels for an image model, else token ids."""
    if "pixel_values" in inspect.signature(model.forward).parameters:
        size = model.config.image_size
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, model.config.num_channels, size, size, generator=generator)
        return {"pixel_values": pixels.to(model.dtype)}
    return {"input_ids": torch.arange(12).reshape(2, 6) % model.config.vocab_size}
