"""Tensor-wise merges of any family: tiny configs of real transformers classes, saved with
``save_pretrained``, merged with every tensor-wise method, loaded back, and pinned against the
methods' formulas written out here."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from accord.cli import main as accord_main  # noqa: E402
from accord.errors import ConfigError, ModelError  # noqa: E402
from accord.llm import load_state_and_config  # noqa: E402
from accord.llm.config import validate_llm_merge_config  # noqa: E402
from accord.llm.merge import merge_checkpoints  # noqa: E402
from accord.llm.testing import (  # noqa: E402
    TENSORWISE_VARIANTS,
    tiny_any_model,
    tiny_inputs,
)

ARCHITECTURES = [name for name in TENSORWISE_VARIANTS if hasattr(transformers, name)]
Saved = dict[str, Path]


pytestmark = pytest.mark.usefixtures("single_thread")


def _finetune(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Saved]:
    """A base and two fine-tuned models of an architecture, written by ``save_pretrained``
    (the second in several shards), built once per architecture."""
    cache: dict[str, Saved] = {}

    def build(architecture: str) -> Saved:
        if architecture not in cache:
            root = tmp_path_factory.mktemp(architecture)
            paths = {name: root / name for name in ("base", "ft1", "ft2")}
            tiny_any_model(architecture, seed=0).save_pretrained(paths["base"])
            _finetune(tiny_any_model(architecture, seed=0), 1).save_pretrained(paths["ft1"])
            _finetune(tiny_any_model(architecture, seed=0), 2).save_pretrained(
                paths["ft2"], max_shard_size="20KB"
            )
            cache[architecture] = paths
        return cache[architecture]

    return build


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_state_and_config(path)[0]


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    x, y = a.double().flatten(), b.double().flatten()
    cos = float(x @ y / (x.norm() * y.norm()))
    if abs(cos) > 1 - 1e-7:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _top_half(delta: torch.Tensor) -> torch.Tensor:
    """The ⌊n/2⌋ largest-magnitude entries of ``delta``, the others zeroed."""
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(flat.numel() // 2).indices
    kept[index] = flat[index]
    return kept.reshape(delta.shape)


def _elected(weighted: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES: the agreeing weighted entries summed, over the agreeing weights."""
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [(d.sign() == sign) for d in weighted]
    total = sum(d * a for d, a in zip(weighted, agree, strict=True))
    divisor = sum(w * a for w, a in zip(weights, agree, strict=True))
    return total / torch.where(divisor == 0, 1.0, divisor)


def _dare_kept(name: str, deltas: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Each task vector's entries kept with probability 1/2, times 2, drawn as documented: one
    generator per tensor seeded by seed XOR crc32(name), the models in order."""
    generator = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    return [d * (torch.rand(d.shape, generator=generator) >= 0.5) / 0.5 for d in deltas]


# method -> (options of merge_checkpoints, expected merged tensor from (base, ft1, ft2, name))
CASES: dict[str, tuple[dict, Callable[..., torch.Tensor]]] = {
    "linear": ({"weights": [1.0, 3.0]}, lambda b, f1, f2, n: (f1 + 3 * f2) / 4),
    "slerp": ({"parameters": {"t": 0.3}}, lambda b, f1, f2, n: _slerp(b, f1, 0.3)),
    "task_arithmetic": (
        {"weights": [0.5, 1.0], "parameters": {"scale": 0.8}},
        lambda b, f1, f2, n: b + 0.8 * (0.5 * (f1 - b) + (f2 - b)),
    ),
    "ties": (
        {"weights": [0.5, 0.5], "parameters": {"density": 0.5}},
        lambda b, f1, f2, n: (
            b + _elected([0.5 * _top_half(f1 - b), 0.5 * _top_half(f2 - b)], [0.5, 0.5])
        ),
    ),
    "dare": (
        {"weights": [0.5, 1.0], "parameters": {"drop_rate": 0.5}, "seed": 7},
        lambda b, f1, f2, n: (
            b
            + sum(
                w * d for w, d in zip([0.5, 1.0], _dare_kept(n, [f1 - b, f2 - b], 7), strict=True)
            )
        ),
    ),
    "dare_ties": (
        {"weights": [0.5, 1.0], "parameters": {"drop_rate": 0.5}, "seed": 7},
        lambda b, f1, f2, n: (
            b
            + _elected(
                [
                    w * d
                    for w, d in zip([0.5, 1.0], _dare_kept(n, [f1 - b, f2 - b], 7), strict=True)
                ],
                [0.5, 1.0],
            )
        ),
    ),
}


def _merge(paths: Saved, method: str, out: Path, **extra: object) -> Path:
    options, _ = CASES[method]
    if method in ("linear", "slerp"):
        models = (
            [paths["ft1"], paths["ft2"]] if method == "linear" else [paths["base"], paths["ft1"]]
        )
        return merge_checkpoints(models, out, method=method, **options, **extra)
    return merge_checkpoints(
        [paths["ft1"], paths["ft2"]], out, method=method, base=paths["base"], **options, **extra
    )


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_merges_tensor_wise_and_loads(
    saved: Callable[[str], Saved], tmp_path: Path, architecture: str, method: str
) -> None:
    paths = saved(architecture)
    out = _merge(paths, method, tmp_path / "merged")
    model = getattr(transformers, architecture).from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(**tiny_inputs(model)).logits
    assert torch.isfinite(logits).all()
    merged, base, ft1, ft2 = (_load(p) for p in (out, paths["base"], paths["ft1"], paths["ft2"]))
    assert merged.keys() == base.keys()
    names = sorted(merged)
    _, expected = CASES[method]
    for name in (names[0], names[len(names) // 2], names[-1]):
        torch.testing.assert_close(merged[name], expected(base[name], ft1[name], ft2[name], name))


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "Gemma3ForCausalLM"])
def test_tied_head_is_not_stored_and_ties_to_the_merged_embedding(
    saved: Callable[[str], Saved], tmp_path: Path, architecture: str
) -> None:
    paths = saved(architecture)
    out = _merge(paths, "task_arithmetic", tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _load(out)
    model = getattr(transformers, architecture).from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    embedding = next(n for n in _load(out) if n.endswith(("wte.weight", "embed_tokens.weight")))
    assert torch.equal(model.get_input_embeddings().weight, _load(out)[embedding])


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``change`` to the tensors of a single-file checkpoint."""
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("method", ["linear", "dare_ties"])
def test_integer_buffers_are_copied_never_averaged(tmp_path: Path, method: str) -> None:
    """Old BERT checkpoints store position ids (int64): the merge copies them from the receiver
    (the base, or the first model) whatever the dtype asked for the floating tensors."""
    paths = {name: tmp_path / name for name in ("base", "ft1", "ft2")}
    for seed, path in enumerate(paths.values()):
        model = tiny_any_model("BertForSequenceClassification")
        if seed:
            _finetune(model, seed)
        model.save_pretrained(path)
        ids = torch.arange(512).unsqueeze(0) + 100 * seed  # differ, so an average would show
        _rewrite(path, lambda state, ids=ids: state.update({"bert.embeddings.position_ids": ids}))
    out = tmp_path / "merged"
    if method == "linear":
        merge_checkpoints([paths["ft1"], paths["ft2"]], out, dtype=torch.bfloat16)
        source = paths["ft1"]
    else:
        merge_checkpoints(
            [paths["ft1"], paths["ft2"]],
            out,
            method=method,
            base=paths["base"],
            parameters={"drop_rate": 0.3},
            dtype=torch.bfloat16,
        )
        source = paths["base"]
    merged = _load(out)
    ids = merged["bert.embeddings.position_ids"]
    assert ids.dtype == torch.int64
    assert torch.equal(ids, _load(source)["bert.embeddings.position_ids"])
    assert merged["bert.pooler.dense.weight"].dtype == torch.bfloat16


def test_each_tensor_keeps_its_dtype(tmp_path: Path) -> None:
    """bfloat16 checkpoints with a float32 norm: the output keeps both, the merge computed in
    float32 and rounded once."""
    paths = {name: tmp_path / name for name in ("base", "ft1")}
    for seed, path in enumerate(paths.values()):
        model = tiny_any_model("Gemma2ForCausalLM", dtype=torch.bfloat16)
        if seed:
            _finetune(model, seed)
        model.save_pretrained(path)
        _rewrite(
            path,
            lambda state: state.update({"model.norm.weight": state["model.norm.weight"].float()}),
        )
    out = merge_checkpoints(
        [paths["ft1"]],
        tmp_path / "merged",
        method="task_arithmetic",
        base=paths["base"],
        parameters={"scale": 0.5},
    )
    merged, base, ft1 = _load(out), _load(paths["base"]), _load(paths["ft1"])
    assert merged["model.norm.weight"].dtype == torch.float32
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    expected = base[name].float() + 0.5 * (ft1[name].float() - base[name].float())
    assert torch.equal(merged[name], expected.bfloat16())


def test_a_tensor_of_another_shape_is_named_with_both_files(tmp_path: Path) -> None:
    tiny_any_model("GPT2LMHeadModel").save_pretrained(tmp_path / "a")
    tiny_any_model("GPT2LMHeadModel", n_positions=32).save_pretrained(tmp_path / "b")
    with pytest.raises(ModelError) as error:
        merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    message = str(error.value)
    assert "'transformer.wpe.weight'" in message and "(64, 32)" in message and "(32, 32)" in message
    assert str(tmp_path / "a" / "model.safetensors") in message
    assert str(tmp_path / "b" / "model.safetensors") in message
    assert not (tmp_path / "out").exists()


def test_a_missing_or_extra_tensor_is_named(tmp_path: Path) -> None:
    for name in ("a", "b"):
        tiny_any_model("Qwen3ForCausalLM").save_pretrained(tmp_path / name)
    _rewrite(tmp_path / "b", lambda state: state.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(
        ModelError,
        match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is in .*a.* but not in .*b",
    ):
        merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(
        ModelError, match=r"k_norm\.weight' is in .*a.*model\.safetensors but not in .*b"
    ):
        merge_checkpoints([tmp_path / "b", tmp_path / "a"], tmp_path / "out")


def test_different_architectures_are_refused(tmp_path: Path) -> None:
    tiny_any_model("Qwen3ForCausalLM").save_pretrained(tmp_path / "qwen3")
    tiny_any_model("Olmo2ForCausalLM").save_pretrained(tmp_path / "olmo2")
    with pytest.raises(
        ConfigError, match=r"architectures differ.*Qwen3ForCausalLM.*Olmo2ForCausalLM"
    ):
        merge_checkpoints([tmp_path / "qwen3", tmp_path / "olmo2"], tmp_path / "out")


def test_align_is_refused_by_family_name(saved: Callable[[str], Saved], tmp_path: Path) -> None:
    paths = saved("MixtralForCausalLM")
    expected = (
        "family MixtralForCausalLM .* has no symmetry table; tensor-wise merges work without align"
    )
    with pytest.raises(ConfigError, match=expected):
        merge_checkpoints(
            [paths["ft1"]],
            tmp_path / "out",
            method="task_arithmetic",
            base=paths["base"],
            receiver=paths["ft2"],
            align=True,
        )
    data = {
        "method": "task_arithmetic",
        "base": str(paths["base"]),
        "receiver": str(paths["ft2"]),
        "models": [str(paths["ft1"])],
        "align": True,
        "output": str(tmp_path / "out"),
    }
    with pytest.raises(ConfigError, match=expected):
        validate_llm_merge_config(data)
    assert not (tmp_path / "out").exists()


def test_cli_merges_any_family_into_the_folder_on_the_command_line(
    saved: Callable[[str], Saved], tmp_path: Path
) -> None:
    paths = saved("MixtralForCausalLM")
    config = tmp_path / "ties.yaml"
    config.write_text(
        f"method: ties\nbase: {paths['base']}\nmodels: [{paths['ft1']}, {paths['ft2']}]\n"
        "parameters: {density: 0.5, weight: 0.5}\n",
        encoding="utf-8",
    )
    assert accord_main(["llm-merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    expected = _merge(paths, "ties", tmp_path / "expected")
    merged = _load(tmp_path / "out")
    assert all(torch.equal(t, _load(expected)[k]) for k, t in merged.items())
