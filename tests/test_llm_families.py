"""Exact symmetries beyond the Llama layout (Qwen3, Gemma 2/3, Phi-3, OLMo 2, GPT-2), each on a
tiny model of the real transformers class: every exact kind keeps the logits, the kinds a family
excludes are refused (and really would change the logits), alignment by weights and by
activations recovers a random symmetry, and an aligned merge transfers a task vector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from accord.errors import ModelError  # noqa: E402
from accord.llm import (  # noqa: E402
    LayerSymmetry,
    Symmetry,
    align,
    apply_symmetry,
    load_state_and_config,
    random_symmetry,
    transform_tensor,
)
from accord.llm._models import unpack  # noqa: E402
from accord.llm.merge import merge_checkpoints  # noqa: E402
from accord.llm.testing import tiny_any_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# name -> (architecture, config overrides): every family, and the options that change its table
# (untied lm_head: the final norm's scale; biases; a single key/value head).
VARIANTS = {
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen3-bias-mqa": ("Qwen3ForCausalLM", {"attention_bias": True, "num_key_value_heads": 1}),
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3-untied": ("Gemma3ForCausalLM", {"tie_word_embeddings": False}),
    "phi3": ("Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2ForCausalLM", {}),
    "gpt2": ("GPT2LMHeadModel", {}),
    "gpt2-untied": ("GPT2LMHeadModel", {"tie_word_embeddings": False}),
}


def _model(variant: str, seed: int = 0) -> torch.nn.Module:
    architecture, overrides = VARIANTS[variant]
    return tiny_any_model(architecture, seed=seed, dtype=torch.float64, **overrides)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(40).reshape(2, 20) * 7 % 100
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same_function(model: torch.nn.Module, moved: torch.nn.Module) -> None:
    # Hugging Face's RMSNorm computes in float32 even in a float64 model, hence ~1e-6.
    torch.testing.assert_close(_logits(moved), _logits(model), rtol=1e-6, atol=1e-6)


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    after = b.state_dict()
    return max(float((after[k] - v).abs().max()) for k, v in a.state_dict().items())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def test_each_exact_kind_preserves_logits_and_moves_weights(variant: str) -> None:
    model = _model(variant)
    arch = unpack(model).arch
    for kind in arch.kinds:
        moved = random_symmetry(model, seed=1, kinds=[kind])
        _assert_same_function(model, moved)
        trivial = (kind == "kv_groups" and arch.kv_heads == 1) or (
            kind == "query_heads" and arch.group_size == 1
        )
        assert trivial or _max_difference(model, moved) > 1e-3, f"{kind} changed no weight"


@pytest.mark.parametrize("vo", ["orthogonal", "invertible"])
def test_every_exact_kind_together_preserves_logits(variant: str, vo: str) -> None:
    model = _model(variant)
    _assert_same_function(model, random_symmetry(model, seed=2, vo=vo))


def _force(model: torch.nn.Module, symmetry: Symmetry) -> torch.nn.Module:
    """``model`` moved by ``symmetry`` tensor by tensor, bypassing the family's checks."""
    arch = unpack(model).arch
    moved = type(model)(model.config).to(torch.float64).eval()
    state = {k: transform_tensor(k, v, symmetry, arch) for k, v in model.state_dict().items()}
    moved.load_state_dict(state)
    return moved


@pytest.mark.parametrize(
    ("variant_name", "kind", "layer"),
    [
        ("qwen3", "qk_rotation", LayerSymmetry(qk_angle=torch.full((2, 4), 0.7))),
        ("olmo2", "qk_rotation", LayerSymmetry(qk_angle=torch.full((2, 4), 0.7))),
        ("gpt2", "mlp_scale", LayerSymmetry(mlp_scale=torch.linspace(0.5, 2.0, 128))),
    ],
)
def test_excluded_kinds_are_refused_and_would_change_the_logits(
    variant_name: str, kind: str, layer: LayerSymmetry
) -> None:
    model = _model(variant_name)
    arch = unpack(model).arch
    assert kind not in arch.kinds
    with pytest.raises(ModelError, match=f"{kind} is not a symmetry of {arch.name}"):
        random_symmetry(model, seed=1, kinds=[kind])
    symmetry = Symmetry(layers=[layer, LayerSymmetry()])
    with pytest.raises(ModelError, match=f"{kind} map, not a symmetry of {arch.name}"):
        apply_symmetry(model.state_dict(), symmetry, arch)
    forced = _force(model, symmetry)
    assert float((_logits(forced) - _logits(model)).abs().max()) > 1e-3


@pytest.mark.parametrize("variant_name", ["qwen3", "gemma3-untied"])
def test_shared_qk_norm_takes_one_scale_per_plane_for_every_group(variant_name: str) -> None:
    """Under a q/k norm whose gain every head shares, the q/k scale lives on that gain: the same
    per-plane scale for every group is exact; different ones per group cannot be put on one
    gain and are refused."""
    model = _model(variant_name)
    arch = unpack(model).arch
    shared = LayerSymmetry(qk_scale=torch.linspace(0.5, 2.0, 4).expand(2, 4).clone())
    moved = apply_symmetry(model.state_dict(), Symmetry(layers=[shared, LayerSymmetry()]), arch)
    assert not torch.allclose(
        moved["model.layers.0.self_attn.q_norm.weight"],
        model.state_dict()["model.layers.0.self_attn.q_norm.weight"],
    )
    _assert_same_function(model, _force(model, Symmetry(layers=[shared, LayerSymmetry()])))
    per_group = Symmetry(
        layers=[LayerSymmetry(qk_scale=torch.tensor([[0.5] * 4, [2.0] * 4])), LayerSymmetry()]
    )
    with pytest.raises(ModelError, match="differs between key/value groups"):
        apply_symmetry(model.state_dict(), per_group, arch)


def test_weight_matching_recovers_a_random_symmetry(variant: str) -> None:
    original = _model(variant)
    moved = random_symmetry(original, seed=1, vo="orthogonal")
    assert _max_difference(original, moved) > 0.05
    assert _max_difference(original, align(moved, to=original)) < 1e-6


def test_activation_matching_recovers_a_random_symmetry(variant: str) -> None:
    original = _model(variant)
    moved = random_symmetry(original, seed=1)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 100, (4, 16), generator=generator) for _ in range(3)]
    back = align(moved, to=original, data=data)
    assert _max_difference(original, back) < 1e-5
    _assert_same_function(moved, back)


def _finetuned(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    model = type(base)(base.config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in base.state_dict().items()
    }
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("variant_name", ["qwen3", "gemma2", "phi3", "olmo2", "gpt2"])
def test_aligned_merge_transfers_a_task_vector_to_a_moved_receiver(
    variant_name: str, tmp_path: Path
) -> None:
    """The receiver is the base in other coordinates: aligned, it takes the task vector as the
    base would (the result is the fine-tuned model); unaligned, the vector lands elsewhere."""
    architecture, overrides = VARIANTS[variant_name]
    base = tiny_any_model(architecture, seed=0, **overrides)
    paths = {"base": base, "ft": _finetuned(base, 1), "receiver": random_symmetry(base, seed=3)}
    for name, model in paths.items():
        model.save_pretrained(tmp_path / name)
    common = {
        "method": "task_arithmetic",
        "base": tmp_path / "base",
        "receiver": tmp_path / "receiver",
    }
    aligned = merge_checkpoints([tmp_path / "ft"], tmp_path / "aligned", align=True, **common)
    plain = merge_checkpoints([tmp_path / "ft"], tmp_path / "plain", **common)
    target = load_state_and_config(tmp_path / "ft")[0]
    got, unaligned = (load_state_and_config(p)[0] for p in (aligned, plain))
    assert max(float((got[k] - t).abs().max()) for k, t in target.items()) < 1e-5
    assert max(float((unaligned[k] - t).abs().max()) for k, t in target.items()) > 0.1
    merged = transformers.AutoModelForCausalLM.from_pretrained(aligned).eval()
    torch.testing.assert_close(_logits(merged), _logits(paths["ft"]), rtol=1e-4, atol=1e-4)


def test_gpt2_causal_mask_buffers_are_kept_and_unknown_tensors_refused() -> None:
    model = _model("gpt2")
    state = dict(model.state_dict())
    mask = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    state["transformer.h.0.attn.bias"] = mask
    config = model.config.to_dict() | {"architectures": ["GPT2LMHeadModel"]}
    moved = random_symmetry(state, config, seed=1)
    assert torch.equal(moved["transformer.h.0.attn.bias"], mask)
    assert not torch.allclose(moved["transformer.wte.weight"], state["transformer.wte.weight"])
    state["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ModelError, match=r"attn\.extra\.weight.*refusing to guess"):
        random_symmetry(state, config, seed=1)
