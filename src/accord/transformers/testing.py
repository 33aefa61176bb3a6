"""Tiny random Llama-family models for tests and examples (needs ``transformers``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
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

    sizes: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 100,
        "tie_word_embeddings": False,
        **overrides,
    }
    return getattr(transformers, _CLASSES[family][0])(**sizes)


def tiny_model(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """A :func:`tiny_config` model in eval mode whose every parameter (norm gains and biases
    too, which Hugging Face initialises to 1 and 0) has random noise added, so that no
    symmetry is hidden by a constant tensor."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, _CLASSES[family][1])(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.to(dtype).eval()
