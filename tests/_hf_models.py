"""Tiny random configs of Hugging Face classes, vision and text, encoders and decoders, shared by
the tests that trace them (test_trace_hf) and merge their folders (test_cli_models).

``BUILDERS[name]()`` gives a fresh randomly initialised model (seed it first) and a function of
the batch size that draws inputs for it. Importing this module skips the importing test module
when transformers is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 64


class Logits(nn.Module):
    """``x -> model(x).logits``, the way a user hands a Hugging Face model to accord."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


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
# Families measured by the survey beyond BUILDERS (same checks, test_trace_hf); the slowest are
# marked slow by name in SLOW_FAMILIES.
_SMALL_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
)


def _images_16(batch: int = 2) -> torch.Tensor:
    return _images(batch, 16)


def _default_init(model: nn.Module) -> nn.Module:
    """PyTorch's default initialisation, for classes whose own (convolutions drawn with std
    0.02) shrinks a tiny random model's logits to nothing: checks on such logits check
    nothing (test_trace_hf fails on them)."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _batchnorm_fitted(model: nn.Module, inputs: Callable[[int], torch.Tensor]) -> nn.Module:
    """BatchNorm's running statistics measured on a few batches of ``inputs``: with the
    initial ones (mean 0, variance 1) a deep stack of default-initialised convolutions shrinks
    the signal until the logits are the classifier's bias, the same for every input. Such
    nearly constant features are also nearly collinear (MobileViT's last blocks: 82 % of their
    variance in one direction), so no matching can find a twin's features among them (its
    twin came back 8.7e-4 off by permutations, 6.3e-5 by CCA; exactly once fitted)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(inputs(16))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _default_images_model(
    model: nn.Module, images: Callable[[int], torch.Tensor] = _images
) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    return _batchnorm_fitted(_default_init(model), images), images


def _falcon(**config: object) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, bias=True
    )
    return transformers.FalconForCausalLM(transformers.FalconConfig(**base, **config)), _tokens


MORE_BUILDERS: dict[str, Callable[[], tuple[nn.Module, Callable[[int], torch.Tensor]]]] = {
    "opt": lambda: (
        transformers.OPTForCausalLM(
            transformers.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=20,
            )
        ),
        _tokens,
    ),
    "gpt-neo": lambda: (
        transformers.GPTNeoForCausalLM(
            transformers.GPTNeoConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                attention_types=[[["global", "local"], 1]],
                intermediate_size=48,
                max_position_embeddings=20,
                window_size=4,
            )
        ),
        _tokens,
    ),
    "gpt-neox": lambda: (
        transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(**_SMALL_DECODER, max_position_embeddings=20)
        ),
        _tokens,
    ),
    "gptj": lambda: (
        transformers.GPTJForCausalLM(
            transformers.GPTJConfig(
                vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=20
            )
        ),
        _tokens,
    ),
    "bloom": lambda: (
        transformers.BloomForCausalLM(
            transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
        ),
        _tokens,
    ),
    "phi": lambda: (transformers.PhiForCausalLM(transformers.PhiConfig(**_SMALL_DECODER)), _tokens),
    "stablelm": lambda: (
        transformers.StableLmForCausalLM(
            transformers.StableLmConfig(**_SMALL_DECODER, num_key_value_heads=2)
        ),
        _tokens,
    ),
    "olmo": lambda: (
        transformers.OlmoForCausalLM(transformers.OlmoConfig(**_SMALL_DECODER, pad_token_id=0)),
        _tokens,
    ),
    "olmo2": lambda: (
        transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_SMALL_DECODER, pad_token_id=0)),
        _tokens,
    ),
    "gemma2": lambda: (
        transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**_SMALL_DECODER, num_key_value_heads=2, head_dim=8)
        ),
        _tokens,
    ),
    "qwen3": lambda: (
        transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**_SMALL_DECODER, num_key_value_heads=2, head_dim=8)
        ),
        _tokens,
    ),
    "granite": lambda: (
        transformers.GraniteForCausalLM(
            transformers.GraniteConfig(**_SMALL_DECODER, num_key_value_heads=2)
        ),
        _tokens,
    ),
    "albert": lambda: (
        transformers.AlbertForSequenceClassification(
            transformers.AlbertConfig(**_ENCODER, embedding_size=16)
        ),
        _tokens,
    ),
    "electra": lambda: (
        transformers.ElectraForSequenceClassification(
            transformers.ElectraConfig(**_ENCODER, embedding_size=16)
        ),
        _tokens,
    ),
    "xlm-roberta": lambda: (
        transformers.XLMRobertaForSequenceClassification(
            transformers.XLMRobertaConfig(**_ENCODER, pad_token_id=1)
        ),
        _tokens,
    ),
    "deberta-v2": lambda: (
        transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**_ENCODER)),
        _tokens,
    ),
    "mpnet": lambda: (
        transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**_ENCODER)),
        _tokens,
    ),
    "modernbert": lambda: (
        transformers.ModernBertForSequenceClassification(
            transformers.ModernBertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=48,
                pad_token_id=0,
            )
        ),
        _tokens,
    ),
    "mobilenet-v2": lambda: _default_images_model(
        transformers.MobileNetV2ForImageClassification(
            transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=3)
        ),
    ),
    "regnet": lambda: (
        transformers.RegNetForImageClassification(
            transformers.RegNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=3
            )
        ),
        _images,
    ),
    "convnextv2": lambda: (
        transformers.ConvNextV2ForImageClassification(
            transformers.ConvNextV2Config(
                hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3
            )
        ),
        _images,
    ),
    "beit": lambda: (
        transformers.BeitForImageClassification(transformers.BeitConfig(**_VIT)),
        _images_16,
    ),
    "dinov2": lambda: (
        transformers.Dinov2ForImageClassification(
            transformers.Dinov2Config(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                mlp_ratio=2,
                num_labels=3,
            )
        ),
        _images_16,
    ),
    "poolformer": lambda: (
        transformers.PoolFormerForImageClassification(
            transformers.PoolFormerConfig(
                hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=3
            )
        ),
        _images,
    ),
    "segformer": lambda: (
        transformers.SegformerForImageClassification(
            transformers.SegformerConfig(
                hidden_sizes=[8, 16, 16, 16],
                depths=[1, 1, 1, 1],
                num_attention_heads=[1, 2, 2, 2],
                decoder_hidden_size=16,
                num_labels=3,
            )
        ),
        _images,
    ),
    "levit": lambda: _default_images_model(
        transformers.LevitForImageClassification(
            transformers.LevitConfig(
                image_size=32,
                hidden_sizes=[16, 24, 32],
                num_attention_heads=[1, 2, 2],
                depths=[1, 1, 1],
                key_dim=[8, 8, 8],
                num_labels=3,
            )
        ),
    ),
    "focalnet": lambda: (
        transformers.FocalNetForImageClassification(
            transformers.FocalNetConfig(
                image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_labels=3
            )
        ),
        _images,
    ),
    "swinv2": lambda: (
        transformers.Swinv2ForImageClassification(
            transformers.Swinv2Config(
                image_size=32,
                patch_size=4,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=4,
                num_labels=3,
            )
        ),
        _images,
    ),
    "mobilevit": lambda: _default_images_model(
        transformers.MobileViTForImageClassification(
            transformers.MobileViTConfig(
                image_size=32,
                hidden_sizes=[16, 24, 32],
                neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                num_labels=3,
            )
        ),
    ),
    "efficientnet": lambda: _default_images_model(
        transformers.EfficientNetForImageClassification(
            transformers.EfficientNetConfig(depth_coefficient=0.1, image_size=32, num_labels=3)
        ),
    ),
    # Falcon's other layouts of its fused q, k and v (BUILDERS' "falcon" is multi-query):
    # per key/value group its query heads, its key and its value in a row (Falcon-40B)
    "falcon-grouped": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2),
    # q, k and v interleaved per head
    "falcon-heads": lambda: _falcon(multi_query=False),
    # ALiBi: a position bias of each head's own, through the attention mask
    "falcon-alibi": lambda: _falcon(alibi=True),
    "falcon-alibi-heads": lambda: _falcon(alibi=True, multi_query=False),
    # attention written out: q @ kᵀ plus the ALiBi bias, softmax, @ v
    "falcon-alibi-eager": lambda: _falcon(alibi=True, attn_implementation="eager"),
}
SLOW_FAMILIES = ("mobilevit", "efficientnet")

# Issue #16's survey: further classes, measured by the same test (test_trace_hf). Where the
# class's own initialisation shrinks a tiny random model's logits to nothing (convolutions
# drawn with std 0.02), PyTorch's default initialisation is restored, so that the checks
# compare numbers that carry the model's function.


def _ending_in_eos(batch: int = 2) -> torch.Tensor:
    """Tokens whose last one alone is the end of sequence (id 2): Bart-like classifiers read
    the features at the end-of-sequence token."""
    tokens = torch.randint(3, VOCAB, (batch, 7))
    tokens[:, -1] = 2
    return tokens


def _images_64(batch: int = 2) -> torch.Tensor:
    return _images(batch, 64)


_SEQ2SEQ = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=20,
)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
_PYRAMID = dict(
    image_size=32,
    depths=[1, 1, 1, 1],
    hidden_sizes=[8, 16, 16, 16],
    num_attention_heads=[1, 1, 2, 2],
    mlp_ratios=[2, 2, 2, 2],
    num_labels=3,
)

FURTHER_BUILDERS: dict[str, Callable[[], tuple[nn.Module, Callable[[int], torch.Tensor]]]] = {
    # multi-query attention: one key and one value head sliced off the fused projection
    "gpt-bigcode": lambda: (
        transformers.GPTBigCodeForCausalLM(
            transformers.GPTBigCodeConfig(
                vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=20
            )
        ),
        _tokens,
    ),
    "codegen": lambda: (
        transformers.CodeGenForCausalLM(
            transformers.CodeGenConfig(
                vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=20
            )
        ),
        _tokens,
    ),
    "starcoder2": lambda: (
        transformers.Starcoder2ForCausalLM(
            transformers.Starcoder2Config(
                **_SMALL_DECODER, num_key_value_heads=2, max_position_embeddings=20
            )
        ),
        _tokens,
    ),
    "cohere": lambda: (
        transformers.CohereForCausalLM(
            transformers.CohereConfig(**_SMALL_DECODER, num_key_value_heads=2)
        ),
        _tokens,
    ),
    "gemma3": lambda: (
        transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(
                **_SMALL_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4
            )
        ),
        _tokens,
    ),
    "persimmon": lambda: (
        transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**_SMALL_DECODER)),
        _tokens,
    ),
    "qwen2-moe": lambda: (
        transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                **_DECODER,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
            )
        ),
        _tokens,
    ),
    "olmoe": lambda: (
        transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(**_DECODER, num_experts=4, num_experts_per_tok=2)
        ),
        _tokens,
    ),
    "mpt": lambda: (
        transformers.MptForCausalLM(
            transformers.MptConfig(
                vocab_size=VOCAB,
                d_model=32,
                n_heads=4,
                n_layers=1,
                expansion_ratio=2,
                max_seq_len=20,
            )
        ),
        _tokens,
    ),
    "biogpt": lambda: (
        transformers.BioGptForCausalLM(transformers.BioGptConfig(**_ENCODER)),
        _tokens,
    ),
    # attention on batch and heads merged (bmm); sinusoidal positions outside the state dict
    "xglm": lambda: (
        transformers.XGLMForCausalLM(
            transformers.XGLMConfig(
                vocab_size=VOCAB,
                d_model=32,
                num_layers=1,
                attention_heads=4,
                ffn_dim=48,
                max_position_embeddings=20,
            )
        ),
        _tokens,
    ),
    "convbert": lambda: (
        transformers.ConvBertForSequenceClassification(
            transformers.ConvBertConfig(**_ENCODER, embedding_size=32, conv_kernel_size=3)
        ),
        _tokens,
    ),
    "squeezebert": lambda: (
        transformers.SqueezeBertForSequenceClassification(
            transformers.SqueezeBertConfig(**_ENCODER, embedding_size=32)
        ),
        _tokens,
    ),
    "mobilebert": lambda: (
        _default_init(
            transformers.MobileBertForSequenceClassification(
                transformers.MobileBertConfig(
                    **_ENCODER,
                    embedding_size=16,
                    intra_bottleneck_size=16,
                    num_feedforward_networks=2,
                )
            )
        ),
        _tokens,
    ),
    "funnel": lambda: (
        transformers.FunnelForSequenceClassification(
            transformers.FunnelConfig(
                vocab_size=VOCAB,
                block_sizes=[1, 1],
                d_model=32,
                n_head=4,
                d_head=8,
                d_inner=48,
                num_decoder_layers=1,
            )
        ),
        _tokens,
    ),
    "canine": lambda: (
        transformers.CanineForSequenceClassification(
            transformers.CanineConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=48,
                num_hash_functions=2,
                num_hash_buckets=16,
                downsampling_rate=2,
                upsampling_kernel_size=3,
                local_transformer_stride=4,
                max_position_embeddings=64,
            )
        ),
        _tokens,
    ),
    "big-bird": lambda: (
        transformers.BigBirdForSequenceClassification(
            transformers.BigBirdConfig(**_ENCODER, attention_type="original_full")
        ),
        _tokens,
    ),
    "xlnet": lambda: (
        transformers.XLNetForSequenceClassification(
            transformers.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, d_inner=48)
        ),
        _tokens,
    ),
    # the classifiers read the decoder's features at the end-of-sequence token (x[mask])
    "bart": lambda: (
        transformers.BartForSequenceClassification(transformers.BartConfig(**_SEQ2SEQ)),
        _ending_in_eos,
    ),
    "mbart": lambda: (
        transformers.MBartForSequenceClassification(transformers.MBartConfig(**_SEQ2SEQ)),
        _ending_in_eos,
    ),
    "t5": lambda: (
        transformers.T5ForSequenceClassification(
            transformers.T5Config(**_T5, decoder_start_token_id=0, eos_token_id=2)
        ),
        _ending_in_eos,
    ),
    "t5-encoder": lambda: (
        transformers.T5ForTokenClassification(transformers.T5Config(**_T5)),
        _tokens,
    ),
    # a stage's layers index their drop-path rates by stage: depth must exceed the stage
    "cvt": lambda: (
        _default_init(
            transformers.CvtForImageClassification(
                transformers.CvtConfig(
                    embed_dim=[8, 16, 16], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=3
                )
            )
        ),
        _images,
    ),
    "pvt": lambda: (
        _default_init(transformers.PvtForImageClassification(transformers.PvtConfig(**_PYRAMID))),
        _images,
    ),
    "pvt-v2": lambda: (
        _default_init(
            transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**_PYRAMID))
        ),
        _images,
    ),
    "mobilenet-v1": lambda: _default_images_model(
        transformers.MobileNetV1ForImageClassification(
            transformers.MobileNetV1Config(depth_multiplier=0.25, image_size=32, num_labels=3)
        )
    ),
    "data2vec-vision": lambda: (
        transformers.Data2VecVisionForImageClassification(
            transformers.Data2VecVisionConfig(**_VIT)
        ),
        _images_16,
    ),
    "swiftformer": lambda: (
        _default_init(
            transformers.SwiftFormerForImageClassification(
                transformers.SwiftFormerConfig(
                    depths=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16], mlp_ratio=2, num_labels=3
                )
            )
        ),
        _images,
    ),
    # q, k and v cut from one projection on an axis of their own, query positions max-pooled
    "hiera": lambda: (
        _default_init(
            transformers.HieraForImageClassification(
                transformers.HieraConfig(
                    image_size=[32, 32],
                    embed_dim=8,
                    depths=[1, 1, 1, 1],
                    num_heads=[1, 1, 2, 2],
                    num_labels=3,
                )
            )
        ),
        _images,
    ),
    "dinov2-registers": lambda: (
        transformers.Dinov2WithRegistersForImageClassification(
            transformers.Dinov2WithRegistersConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                mlp_ratio=2,
                num_register_tokens=2,
                num_labels=3,
            )
        ),
        _images_16,
    ),
    "mobilevitv2": lambda: _default_images_model(
        transformers.MobileViTV2ForImageClassification(
            transformers.MobileViTV2Config(image_size=64, width_multiplier=0.25, num_labels=3)
        ),
        _images_64,
    ),
    # the attention-pooling head: a learned probe queries nn.MultiheadAttention
    "siglip": lambda: (
        transformers.SiglipForImageClassification(
            transformers.SiglipConfig(
                vision_config=dict(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                ),
                num_labels=3,
            )
        ),
        _images_16,
    ),
    "hgnet-v2": lambda: _default_images_model(
        transformers.HGNetV2ForImageClassification(
            transformers.HGNetV2Config(
                num_labels=3,
                embedding_size=8,
                hidden_sizes=[16, 16, 16, 16],
                depths=[1, 1, 1, 1],
                stem_channels=[3, 8, 8],
                stage_in_channels=[8, 16, 16, 16],
                stage_mid_channels=[8, 8, 8, 8],
                stage_out_channels=[16, 16, 16, 16],
                stage_num_blocks=[1, 1, 1, 1],
                stage_numb_of_layers=[2, 2, 2, 2],
            )
        )
    ),
    "textnet": lambda: (
        _default_init(
            transformers.TextNetForImageClassification(
                transformers.TextNetConfig(
                    num_labels=3,
                    stem_out_channels=8,
                    hidden_sizes=[8, 8, 16, 16, 16],
                    conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
                    conv_layer_strides=[[1], [2], [2], [2]],
                )
            )
        ),
        _images,
    ),
}
FURTHER_SLOW = ("mobilevitv2",)

# Issue #16's second survey: encoders with rotary or fused attention, recent decoders (MoE,
# multi-head latent attention, state-space models), CLIP-style vision towers, detection and
# depth heads, and audio front ends (1-d convolutions, group norm, a positional
# convolution). Measured by the same test (test_trace_hf).


class Output(nn.Module):
    """``x -> model(x).<field>``, handed on as ``.logits``: a tower whose output is not named
    ``logits`` (CLIP's ``image_embeds``, DPT's ``predicted_depth``), wrapped as users wrap
    it."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=getattr(self.model(x), self.field))


def _waveforms(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 400)


def _spectrograms(batch: int = 2) -> torch.Tensor:
    """(batch, frames, mel bins), as the Audio Spectrogram Transformer reads them."""
    return torch.randn(batch, 32, 16)


def _mel_features(batch: int = 2) -> torch.Tensor:
    """(batch, mel bins, frames), as Whisper's encoder reads them."""
    return torch.randn(batch, 8, 16)


_VISION_TOWER = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=48,
)
# wav2vec 2.0's front end: two 1-d convolutions (the first group-normed), a feature
# projection, a grouped positional convolution added to the stream
_AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=48,
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 8),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=4,
    classifier_proj_size=16,
    vocab_size=VOCAB,
    num_labels=3,
)
# DeepSeek's multi-head latent attention: q and kv through low-rank latents, a rotary part of
# each head beside a part without positions, one key rotary part shared by every head
_LATENT_ATTENTION = dict(
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
)

# Perceiver: learned latents read the inputs by cross-attention, learned queries the latents
_PERCEIVER = dict(
    num_latents=8,
    d_latents=32,
    d_model=16,
    num_blocks=1,
    num_self_attends_per_block=1,
    num_self_attention_heads=4,
    num_cross_attention_heads=1,
    num_labels=3,
)

# routed experts beside a shared one, DeepSeek's way (GLM-4-MoE, dots.llm1)
_ROUTED = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
)

SURVEY_BUILDERS: dict[str, Callable[[], tuple[nn.Module, Callable[[int], torch.Tensor]]]] = {
    # text encoders
    "roformer": lambda: (
        transformers.RoFormerForSequenceClassification(
            transformers.RoFormerConfig(**_ENCODER, embedding_size=32)
        ),
        _tokens,
    ),
    # q, k and v fused in one projection and cut per head (chunk of each head's features)
    "deberta": lambda: (
        transformers.DebertaForSequenceClassification(transformers.DebertaConfig(**_ENCODER)),
        _tokens,
    ),
    "esm": lambda: (
        transformers.EsmForSequenceClassification(
            transformers.EsmConfig(**_ENCODER, pad_token_id=1, position_embedding_type="rotary")
        ),
        _tokens,
    ),
    "rembert": lambda: (
        transformers.RemBertForSequenceClassification(
            transformers.RemBertConfig(
                **_ENCODER, input_embedding_size=16, output_embedding_size=16
            )
        ),
        _tokens,
    ),
    "layoutlm": lambda: (
        transformers.LayoutLMForSequenceClassification(
            transformers.LayoutLMConfig(**_ENCODER, max_2d_position_embeddings=32)
        ),
        _tokens,
    ),
    "nystromformer": lambda: (
        transformers.NystromformerForSequenceClassification(
            transformers.NystromformerConfig(**_ENCODER, num_landmarks=7, segment_means_seq_len=7)
        ),
        _tokens,
    ),
    # Fourier mixing along positions and features: the features after the embedding's
    # projection are fixed
    "fnet": lambda: (
        transformers.FNetForSequenceClassification(
            transformers.FNetConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                intermediate_size=48,
                max_position_embeddings=20,
            )
        ),
        _tokens,
    ),
    "ernie": lambda: (
        transformers.ErnieForSequenceClassification(transformers.ErnieConfig(**_ENCODER)),
        _tokens,
    ),
    # decoders
    "nemotron": lambda: (
        transformers.NemotronForCausalLM(transformers.NemotronConfig(**_DECODER)),
        _tokens,
    ),
    "glm": lambda: (
        transformers.GlmForCausalLM(transformers.GlmConfig(**_DECODER, head_dim=8, pad_token_id=0)),
        _tokens,
    ),
    "glm4": lambda: (
        transformers.Glm4ForCausalLM(
            transformers.Glm4Config(**_DECODER, head_dim=8, pad_token_id=0)
        ),
        _tokens,
    ),
    "helium": lambda: (
        transformers.HeliumForCausalLM(transformers.HeliumConfig(**_DECODER, head_dim=8)),
        _tokens,
    ),
    "exaone4": lambda: (
        transformers.Exaone4ForCausalLM(
            transformers.Exaone4Config(**_DECODER, head_dim=8, sliding_window=4)
        ),
        _tokens,
    ),
    "smollm3": lambda: (
        transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**_DECODER, pad_token_id=0)),
        _tokens,
    ),
    "cohere2": lambda: (
        transformers.Cohere2ForCausalLM(transformers.Cohere2Config(**_DECODER, sliding_window=4)),
        _tokens,
    ),
    "olmo3": lambda: (
        transformers.Olmo3ForCausalLM(
            transformers.Olmo3Config(**_DECODER, pad_token_id=0, sliding_window=4)
        ),
        _tokens,
    ),
    "qwen3-moe": lambda: (
        transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **_DECODER,
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
            )
        ),
        _tokens,
    ),
    "phimoe": lambda: (
        transformers.PhimoeForCausalLM(
            transformers.PhimoeConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
        ),
        _tokens,
    ),
    "granitemoe": lambda: (
        transformers.GraniteMoeForCausalLM(
            transformers.GraniteMoeConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
        ),
        _tokens,
    ),
    "ernie4_5": lambda: (
        transformers.Ernie4_5ForCausalLM(
            transformers.Ernie4_5Config(**_DECODER, head_dim=8, pad_token_id=0)
        ),
        _tokens,
    ),
    "arcee": lambda: (
        transformers.ArceeForCausalLM(transformers.ArceeConfig(**_DECODER, pad_token_id=0)),
        _tokens,
    ),
    # xIELU: where(x > 0, ...) with learned scalars, entry by entry: its MLP units permute
    "apertus": lambda: (
        transformers.ApertusForCausalLM(transformers.ApertusConfig(**_DECODER, pad_token_id=0)),
        _tokens,
    ),
    "seed-oss": lambda: (
        transformers.SeedOssForCausalLM(
            transformers.SeedOssConfig(**_DECODER, head_dim=8, pad_token_id=0)
        ),
        _tokens,
    ),
    "hunyuan-dense": lambda: (
        transformers.HunYuanDenseV1ForCausalLM(
            transformers.HunYuanDenseV1Config(**_DECODER, head_dim=8, pad_token_id=0)
        ),
        _tokens,
    ),
    "glm4-moe": lambda: (
        transformers.Glm4MoeForCausalLM(
            transformers.Glm4MoeConfig(**_DECODER, head_dim=8, pad_token_id=0, **_ROUTED)
        ),
        _tokens,
    ),
    "dots1": lambda: (
        transformers.Dots1ForCausalLM(
            transformers.Dots1Config(**_DECODER, head_dim=8, pad_token_id=0, **_ROUTED)
        ),
        _tokens,
    ),
    # every expert on every token (scaled by its routing weight), as one torch.bmm of
    # (experts, tokens, features) by the packed (experts, in, out) parameter
    "llama4": lambda: (
        transformers.Llama4ForCausalLM(
            transformers.Llama4TextConfig(
                **_DECODER,
                head_dim=8,
                num_local_experts=4,
                num_experts_per_tok=1,
                intermediate_size_mlp=48,
                pad_token_id=0,
            )
        ),
        _tokens,
    ),
    # experts with biases (each token's picked by its sorted expert id) and gate and up
    # units interleaved in one packed parameter, clamped
    "gpt-oss": lambda: (
        transformers.GptOssForCausalLM(
            transformers.GptOssConfig(
                **{**_DECODER, "intermediate_size": 16},
                head_dim=8,
                num_local_experts=4,
                num_experts_per_tok=2,
                pad_token_id=0,
            )
        ),
        _tokens,
    ),
    "granitemoe-shared": lambda: (
        transformers.GraniteMoeSharedForCausalLM(
            transformers.GraniteMoeSharedConfig(
                **_DECODER, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24
            )
        ),
        _tokens,
    ),
    # a short convolution layer (its in_proj fixed: the cache is written in place) and an
    # attention layer
    "lfm2": lambda: (
        transformers.Lfm2ForCausalLM(
            transformers.Lfm2Config(
                **{**_DECODER, "num_hidden_layers": 2},
                pad_token_id=0,
                layer_types=["conv", "full_attention"],
            )
        ),
        _tokens,
    ),
    # experts in a Python loop (F.linear on each expert's slice of one parameter), summed back
    # by index_add; its mixture of attention heads stays fixed
    "jetmoe": lambda: (
        transformers.JetMoeForCausalLM(
            transformers.JetMoeConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_key_value_heads=2,
                kv_channels=8,
                intermediate_size=48,
                num_local_experts=4,
                num_experts_per_tok=2,
            )
        ),
        _tokens,
    ),
    # no key/value groups: multi-head latent attention has a key and a value per query head
    "deepseek-v3": lambda: (
        transformers.DeepseekV3ForCausalLM(
            transformers.DeepseekV3Config(**_SMALL_DECODER, **_LATENT_ATTENTION)
        ),
        _tokens,
    ),
    "deepseek-v2": lambda: (
        transformers.DeepseekV2ForCausalLM(
            transformers.DeepseekV2Config(**_SMALL_DECODER, **_LATENT_ATTENTION)
        ),
        _tokens,
    ),
    # state-space models: the residual stream permutes; the mixer's channels stay fixed
    "mamba": lambda: (
        transformers.MambaForCausalLM(
            transformers.MambaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                state_size=4,
                num_hidden_layers=1,
                expand=2,
                conv_kernel=4,
                time_step_rank=4,
            )
        ),
        _tokens,
    ),
    "falcon-mamba": lambda: (
        transformers.FalconMambaForCausalLM(
            transformers.FalconMambaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                state_size=4,
                num_hidden_layers=1,
                expand=2,
                conv_kernel=4,
                time_step_rank=4,
            )
        ),
        _tokens,
    ),
    "mamba2": lambda: (
        transformers.Mamba2ForCausalLM(
            transformers.Mamba2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                state_size=4,
                num_hidden_layers=1,
                expand=2,
                conv_kernel=4,
                num_heads=8,
                head_dim=8,
                n_groups=1,
                chunk_size=8,
            )
        ),
        _tokens,
    ),
    # vision
    "clip-vision-projection": lambda: (
        Output(
            transformers.CLIPVisionModelWithProjection(
                transformers.CLIPVisionConfig(**_VISION_TOWER, projection_dim=16)
            ),
            "image_embeds",
        ),
        _images_16,
    ),
    "clip": lambda: (
        transformers.CLIPForImageClassification(
            transformers.CLIPConfig(
                vision_config=_VISION_TOWER,
                text_config=dict(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                ),
                num_labels=3,
            )
        ),
        _images_16,
    ),
    "vit-msn": lambda: (
        transformers.ViTMSNForImageClassification(transformers.ViTMSNConfig(**_VIT)),
        _images_16,
    ),
    # the class logits of the detection tokens
    "yolos": lambda: (
        transformers.YolosForObjectDetection(
            transformers.YolosConfig(**{**_VIT, "image_size": [16, 16]}, num_detection_tokens=3)
        ),
        _images_16,
    ),
    "dpt": lambda: (
        Output(
            _default_init(
                transformers.DPTForDepthEstimation(
                    transformers.DPTConfig(
                        **{**_VIT, "num_hidden_layers": 4},
                        backbone_out_indices=[0, 1, 2, 3],
                        neck_hidden_sizes=[8, 8, 16, 16],
                        fusion_hidden_size=16,
                        head_in_index=-1,
                    )
                )
            ),
            "predicted_depth",
        ),
        _images_16,
    ),
    # learned latents and output queries: their q·k spaces are observed at the keys
    "perceiver": lambda: (
        transformers.PerceiverForImageClassificationLearned(
            transformers.PerceiverConfig(**_PERCEIVER, image_size=16)
        ),
        _images_16,
    ),
    "perceiver-text": lambda: (
        transformers.PerceiverForSequenceClassification(
            transformers.PerceiverConfig(**_PERCEIVER, vocab_size=VOCAB, max_position_embeddings=16)
        ),
        _tokens,
    ),
    "ijepa": lambda: (
        transformers.IJepaForImageClassification(transformers.IJepaConfig(**_VIT)),
        _images_16,
    ),
    "metaclip2": lambda: (
        transformers.MetaClip2ForImageClassification(
            transformers.MetaClip2Config(
                vision_config=_VISION_TOWER,
                text_config=dict(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                ),
                num_labels=3,
            )
        ),
        _images_16,
    ),
    "donut-swin": lambda: (
        transformers.DonutSwinForImageClassification(
            transformers.DonutSwinConfig(
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
    # backbones without a head, as x -> model(x).pooler_output: the pooled stream is the
    # output (fixed); 2-d rotary embeddings leave DINOv3's heads as one permutation space
    "dinov3-vit": lambda: (
        Output(
            transformers.DINOv3ViTModel(
                transformers.DINOv3ViTConfig(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                    num_register_tokens=2,
                )
            ),
            "pooler_output",
        ),
        _images_16,
    ),
    "dinov3-convnext": lambda: (
        Output(
            transformers.DINOv3ConvNextModel(
                transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1])
            ),
            "pooler_output",
        ),
        _images,
    ),
    # an output layer tied to the embedding that reads the masked-LM head's own space
    "camembert-mlm": lambda: (
        transformers.CamembertForMaskedLM(transformers.CamembertConfig(**_ENCODER)),
        _tokens,
    ),
    # a learned relative position bias per head, added as the attention mask in every layer
    "umt5": lambda: (
        transformers.UMT5ForSequenceClassification(
            transformers.UMT5Config(**_T5, decoder_start_token_id=0, eos_token_id=2)
        ),
        _ending_in_eos,
    ),
    # audio
    "wav2vec2": lambda: (
        transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(**_AUDIO)),
        _waveforms,
    ),
    "hubert": lambda: (
        transformers.HubertForSequenceClassification(transformers.HubertConfig(**_AUDIO)),
        _waveforms,
    ),
    "wavlm": lambda: (
        transformers.WavLMForSequenceClassification(
            transformers.WavLMConfig(**_AUDIO, num_buckets=8, max_bucket_distance=20)
        ),
        _waveforms,
    ),
    "data2vec-audio": lambda: (
        transformers.Data2VecAudioForSequenceClassification(
            transformers.Data2VecAudioConfig(**_AUDIO)
        ),
        _waveforms,
    ),
    "ast": lambda: (
        transformers.ASTForAudioClassification(
            transformers.ASTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=48,
                patch_size=4,
                frequency_stride=4,
                time_stride=4,
                max_length=32,
                num_mel_bins=16,
                num_labels=3,
            )
        ),
        _spectrograms,
    ),
    "whisper": lambda: (
        _default_init(
            transformers.WhisperForAudioClassification(
                transformers.WhisperConfig(
                    vocab_size=VOCAB,
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=48,
                    decoder_ffn_dim=48,
                    num_mel_bins=8,
                    max_source_positions=8,
                    classifier_proj_size=16,
                    num_labels=3,
                )
            )
        ),
        _mel_features,
    ),
}
SURVEY_SLOW = ("dpt", "mamba2", "perceiver")
