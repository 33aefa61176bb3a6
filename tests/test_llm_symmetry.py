"""Exact transformer symmetries: every kind, alone and together, leaves the logits unchanged."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from accord.errors import ModelError
from accord.llm import (
    SYMMETRY_KINDS,
    Architecture,
    Symmetry,
    apply_symmetry,
    random_symmetry,
    sample_symmetry,
)
from accord.llm.testing import VARIANTS, tiny_model

# (family, overrides): grouped-query attention, multi-head with tied embeddings, Qwen2 biases,
# Mistral, and a single key/value head.


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    family, overrides = VARIANTS[request.param]
    return tiny_model(family, seed=0, dtype=torch.float64, **overrides)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(40).reshape(2, 20) * 7 % 100
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same_function(model: torch.nn.Module, moved: torch.nn.Module) -> None:
    # Hugging Face's RMSNorm computes in float32 even in a float64 model, hence ~1e-6.
    torch.testing.assert_close(_logits(moved), _logits(model), rtol=1e-6, atol=1e-6)


def _changed(model: torch.nn.Module, moved: torch.nn.Module) -> list[str]:
    after = moved.state_dict()
    return [k for k, v in model.state_dict().items() if not torch.allclose(v, after[k])]


@pytest.mark.parametrize("kind", SYMMETRY_KINDS)
def test_each_symmetry_preserves_logits(model: torch.nn.Module, kind: str) -> None:
    moved = random_symmetry(model, seed=1, kinds=[kind])
    _assert_same_function(model, moved)
    n_kv = model.config.num_key_value_heads
    trivial = (kind == "kv_groups" and n_kv == 1) or (
        kind == "query_heads" and model.config.num_attention_heads == n_kv
    )
    assert trivial or _changed(model, moved), f"{kind} changed no weight"


@pytest.mark.parametrize("vo", ["orthogonal", "invertible"])
def test_all_symmetries_together_preserve_logits(model: torch.nn.Module, vo: str) -> None:
    moved = random_symmetry(model, seed=2, vo=vo)
    _assert_same_function(model, moved)
    changed = _changed(model, moved)
    assert len(changed) >= len(model.state_dict()) - 1  # only a tied lm_head may repeat


def test_float32_logits_within_1e4_relative() -> None:
    model = tiny_model("qwen2", seed=3)
    moved = random_symmetry(model, seed=4, vo="invertible")
    reference = _logits(model)
    error = (_logits(moved) - reference).abs().max() / reference.abs().max()
    assert error < 1e-4


def test_state_dict_form_returns_new_dict_and_leaves_input() -> None:
    model = tiny_model("llama", seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    moved = random_symmetry(state, config, seed=6)
    assert set(moved) == set(state)
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor)
    assert not torch.equal(moved["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(
        random_symmetry(state, config, seed=6)["lm_head.weight"], moved["lm_head.weight"]
    )


def test_gqa_query_heads_move_with_their_group() -> None:
    """Permuting key/value groups alone moves whole blocks of q rows (r heads) with k/v rows."""
    model = tiny_model("llama", seed=7, num_attention_heads=4, num_key_value_heads=2)
    arch = Architecture.from_config(
        model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    )
    state = model.state_dict()
    symmetry = sample_symmetry(arch, seed=0, kinds=["kv_groups"])
    symmetry.layers[0].kv_perm = torch.tensor([1, 0])
    moved = apply_symmetry(state, symmetry, arch)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    block = arch.group_size * arch.head_dim
    assert torch.equal(moved[q][:block], state[q][block:])
    assert torch.equal(moved[k][: arch.head_dim], state[k][arch.head_dim :])


def test_per_dimension_residual_scale_is_not_a_symmetry() -> None:
    """Why the residual stream admits only permutations: RMSNorm does not commute with scales."""
    model = tiny_model("llama", seed=8, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, model.config.hidden_size, dtype=torch.float64)
    state = dict(model.state_dict())
    for name, tensor in state.items():
        if name == "model.embed_tokens.weight":
            state[name] = tensor * scale
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = tensor * scale[:, None]
        elif name.endswith("_proj.weight") or name == "lm_head.weight":
            state[name] = tensor / scale
    scaled = type(model)(model.config).to(torch.float64).eval()
    scaled.load_state_dict(state)
    assert (_logits(scaled) - _logits(model)).abs().max() > 1e-3


def test_symmetry_of_wrong_shape_is_refused() -> None:
    model = tiny_model("llama", seed=9)
    arch = Architecture.from_config(
        model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    )
    with pytest.raises(ModelError, match="residual"):
        apply_symmetry(model.state_dict(), Symmetry(residual=torch.arange(5)), arch)
    tied = Architecture.from_config(
        model.config.to_dict()
        | {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    )
    with pytest.raises(ModelError, match="final_norm_scale"):
        apply_symmetry({}, Symmetry(final_norm_scale=torch.ones(arch.hidden)), tied)


def test_unknown_tensor_is_refused() -> None:
    model = tiny_model("llama", seed=10)
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # as in Qwen3
    config = model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ModelError, match="q_norm"):
        random_symmetry(state, config, seed=0)
