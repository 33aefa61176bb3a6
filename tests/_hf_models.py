"""Tiny random configs of Hugging Face classes, vision and text, encoders and decoders, shared by
the tests that trace them (test_trace_hf) and merge their folders (test_cli_models).

``BUILDERS[name]()`` gives a fresh randomly initialised model (seed it first) and a function of
the batch size that draws inputs for it. Importing this module skips the importing test module
when transformers is not installed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, 7))


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=20,
)
_VIT = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=48,
    num_labels=3,
)
_RESNET = dict(embedding_size=8, depths=[1, 1], num_labels=3)

BUILDERS: dict[str, Callable[[], tuple[nn.Module, Callable[[int], torch.Tensor]]]] = {
    "llama": lambda: (transformers.LlamaForCausalLM(transformers.LlamaConfig(**_DECODER)), _tokens),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER)), _tokens),
    "mistral": lambda: (
        transformers.MistralForCausalLM(transformers.MistralConfig(**_DECODER)),
        _tokens,
    ),
    "gemma": lambda: (
        transformers.GemmaForCausalLM(transformers.GemmaConfig(**_DECODER, head_dim=8)),
        _tokens,
    ),
    "phi3": lambda: (
        transformers.Phi3ForCausalLM(transformers.Phi3Config(**_DECODER, pad_token_id=0)),
        _tokens,
    ),
    # FalconLinear is ``x @ W.T + b``; multi-query attention splits the fused q, k, v by heads
    "falcon": lambda: (
        transformers.FalconForCausalLM(
            transformers.FalconConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                bias=True,
            )
        ),
        _tokens,
    ),
    # a mixture of experts: top-2 of 4 experts, tokens sorted by expert for grouped products
    "mixtral": lambda: (
        transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
        ),
        _tokens,
    ),
    "gpt2": lambda: (
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16
            )
        ),
        _tokens,
    ),
    "bert": lambda: (
        transformers.BertForSequenceClassification(transformers.BertConfig(**_ENCODER)),
        _tokens,
    ),
    "roberta": lambda: (
        transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**_ENCODER)),
        _tokens,
    ),
    "distilbert": lambda: (
        transformers.DistilBertForSequenceClassification(
            transformers.DistilBertConfig(
                vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=48
            )
        ),
        _tokens,
    ),
    "vit": lambda: (
        transformers.ViTForImageClassification(transformers.ViTConfig(**_VIT)),
        lambda b: _images(b, 16),
    ),
    "deit": lambda: (
        transformers.DeiTForImageClassification(transformers.DeiTConfig(**_VIT)),
        lambda b: _images(b, 16),
    ),
    "swin": lambda: (
        transformers.SwinForImageClassification(
            transformers.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=4,
                num_labels=3,
            )
        ),
        _images,
    ),
    "resnet-basic": lambda: (
        transformers.ResNetForImageClassification(
            transformers.ResNetConfig(**_RESNET, hidden_sizes=[8, 16], layer_type="basic")
        ),
        _images,
    ),
    "resnet-bottleneck": lambda: (
        transformers.ResNetForImageClassification(
            transformers.ResNetConfig(**_RESNET, hidden_sizes=[16, 32], layer_type="bottleneck")
        ),
        _images,
    ),
    # weight-standardized convolutions: each weight is computed from its parameter per call
    "bit": lambda: (
        transformers.BitForImageClassification(
            transformers.BitConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4, num_labels=3
            )
        ),
        _images,
    ),
    "convnext": lambda: (
        transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(
                hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3
            )
        ),
        _images,
    ),
}
