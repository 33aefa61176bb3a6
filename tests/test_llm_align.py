"""Alignment of Llama-family models: a random-symmetry copy is mapped back onto its original."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from accord.errors import ConfigError
from accord.llm import (
    align,
    find_alignment,
    random_symmetry,
    save_checkpoint,
)
from accord.llm.testing import VARIANTS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    after = b.state_dict()
    return max(float((after[k] - v).abs().max()) for k, v in a.state_dict().items())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(30).reshape(2, 15) * 3 % 100).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weight_matching_recovers_a_random_symmetry(variant: str) -> None:
    family, overrides = VARIANTS[variant]
    original = tiny_model(family, seed=0, **overrides)
    moved = random_symmetry(original, seed=1)
    assert _max_difference(original, moved) > 0.1
    recovered = align(moved, to=original)
    assert _max_difference(original, recovered) < 1e-5


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
def test_activation_matching_recovers_a_random_symmetry(variant: str) -> None:
    family, overrides = VARIANTS[variant]
    original = tiny_model(family, seed=2, **overrides)
    moved = random_symmetry(original, seed=3)
    generator = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(0, 100, (3, 24), generator=generator),
            "attention_mask": torch.ones(3, 24, dtype=torch.long).tril(16)[:, :24],
        }
        for _ in range(2)
    ]
    recovered = align(moved, to=original, data=data)
    assert _max_difference(original, recovered) < 1e-5


def test_aligning_a_different_model_keeps_its_function_and_moves_it_closer() -> None:
    reference = tiny_model("qwen2", seed=4)
    other = tiny_model("qwen2", seed=5)
    noisy = random_symmetry(other, seed=6)
    aligned = align(noisy, to=reference)
    torch.testing.assert_close(_logits(aligned), _logits(other), rtol=1e-4, atol=1e-4)
    distance = {
        name: sum(
            float((model.state_dict()[k] - v).pow(2).sum())
            for k, v in reference.state_dict().items()
            if "norm" not in k  # aligned gains equal the reference's by construction
        )
        for name, model in (("before", noisy), ("after", aligned))
    }
    assert distance["after"] < distance["before"]


def test_pair_and_directory_forms(tmp_path: Path) -> None:
    original = tiny_model("llama", seed=7, tie_word_embeddings=True)
    config = original.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    moved_state = random_symmetry(dict(original.state_dict()), config, seed=8)
    save_checkpoint(tmp_path / "original", dict(original.state_dict()), config)
    state, returned_config = align((moved_state, config), to=tmp_path / "original")
    assert returned_config == config
    for key, tensor in original.state_dict().items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=1e-5)


def test_inputs_are_not_modified() -> None:
    original = tiny_model("llama", seed=9)
    moved = random_symmetry(original, seed=10)
    before = {k: v.clone() for k, v in moved.state_dict().items()}
    find_alignment(moved, to=original)
    assert all(torch.equal(before[k], v) for k, v in moved.state_dict().items())


def test_mismatched_hidden_size_names_the_key() -> None:
    a = tiny_model("llama", seed=0)
    b = tiny_model("llama", seed=0, hidden_size=64, head_dim=16)
    with pytest.raises(ConfigError, match="hidden_size"):
        align(b, to=a)
    c = tiny_model("llama", seed=0, num_key_value_heads=4)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        align(c, to=a)


@pytest.mark.parametrize("module", ["accord.llm.align", "accord.combine._sparse"])
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
