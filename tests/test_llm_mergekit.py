"""mergekit configs run unchanged by ``accord llm-merge CONFIG OUT``, with mergekit's semantics,
pinned by values worked out by hand on toy checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from accord.cli import main as accord_main
from accord.errors import ConfigError
from accord.llm import load_state_and_config, save_checkpoint
from accord.llm.config import load_llm_merge_config
from accord.llm.mergekit import translate_mergekit_config

TOY = {"architectures": ["ToyForTests"], "model_type": "toy"}
# Three layers (positions 0, 1/2, 1) of two tensors each, and two tensors outside the layers.
LAYER_NAMES = [f"model.layers.{i}.{part}.weight" for i in range(3) for part in ("self_attn", "mlp")]
NAMES = ["model.embed.weight", *LAYER_NAMES, "model.norm.weight"]


def _toy(path: Path, values: list[float], **tensors: torch.Tensor) -> Path:
    """A checkpoint whose every tensor is ``values`` (float32), plus ``tensors``."""
    state = {name: torch.tensor(values) for name in NAMES} | tensors
    return save_checkpoint(path, state, TOY)


@pytest.fixture
def toys(tmp_path: Path) -> dict[str, Path]:
    """base 0, and two fine-tuned models whose task vectors are their values."""
    return {
        "base": _toy(tmp_path / "base", [0.0, 0.0, 0.0, 0.0]),
        "ft1": _toy(tmp_path / "ft1", [2.0, -2.0, 1.0, 0.5]),
        "ft2": _toy(tmp_path / "ft2", [4.0, 2.0, -3.0, -0.1]),
    }


def _run(tmp_path: Path, text: str, out: str = "out") -> dict[str, torch.Tensor]:
    config = tmp_path / "mergekit.yml"
    config.write_text(text, encoding="utf-8")
    assert accord_main(["llm-merge", str(config), str(tmp_path / out), "--quiet"]) == 0
    return load_state_and_config(tmp_path / out)[0]


def _models(toys: dict[str, Path], ft1: str, ft2: str) -> str:
    return (
        f"models:\n  - model: {toys['base']}\n"
        f"  - model: {toys['ft1']}\n    parameters: {ft1}\n"
        f"  - model: {toys['ft2']}\n    parameters: {ft2}\n"
    )


def _close(merged: dict[str, torch.Tensor], expected: list[float], names=NAMES) -> None:
    for name in names:
        torch.testing.assert_close(merged[name], torch.tensor(expected), msg=name)


def test_ties_half_weights_normalized_give_the_full_elected_mean(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    # weighted [1, -1, .5, .25] and [2, 1, -1.5, -.05]; sums [3, 0, -1, .2]: +, +, -, +
    # agreeing: both / ft2 / ft2 / ft1, each sum over its agreeing weights
    models = _models(toys, "{weight: 0.5, density: 1.0}", "{weight: 0.5}")
    text = models + f"merge_method: ties\nbase_model: {toys['base']}\n"
    _close(_run(tmp_path, text + "parameters: {normalize: true}\n"), [3.0, 2.0, -3.0, 0.5])
    # normalize false: the agreeing weighted sum
    summed = _run(tmp_path, text + "parameters: {normalize: false}\n", "summed")
    _close(summed, [3.0, 1.0, -1.5, 0.25])
    # normalize is mergekit's default for TIES
    _close(_run(tmp_path, text, "default"), [3.0, 2.0, -3.0, 0.5])


def test_ties_density_per_model_and_from_the_global_parameters(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    # ft1 keeps ⌊.5·4⌋ = 2: [2, -2, 0, 0]; ft2 ⌊.25·4⌋ = 1: [4, 0, 0, 0]
    # sums [6, -2, 0, 0]: +, -, +, +; (2 + 4)/2, -2/1, none, none
    models = _models(toys, "{density: 0.5}", "{density: 0.25}")
    text = models + f"merge_method: ties\nbase_model: {toys['base']}\nparameters: {{weight: 1}}\n"
    _close(_run(tmp_path, text), [3.0, -2.0, 0.0, 0.0])


def test_task_arithmetic_lambda_and_normalize(toys: dict[str, Path], tmp_path: Path) -> None:
    models = _models(toys, "{weight: 1.0}", "{weight: 0.5}")
    text = models + f"merge_method: task_arithmetic\nbase_model: {toys['base']}\n"
    # λ (ft1 + ft2/2) with λ = 0.5
    _close(_run(tmp_path, text + "parameters: {lambda: 0.5}\n"), [2.0, -0.5, -0.25, 0.225])
    # normalize: (ft1 + ft2/2) / 1.5
    normalized = _run(tmp_path, text + "parameters: {normalize: true}\n", "normalized")
    _close(normalized, [8 / 3, -2 / 3, -1 / 3, 0.3])


def test_linear_normalize(toys: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"models:\n  - model: {toys['ft1']}\n    parameters: {{weight: 3}}\n"
        f"  - model: {toys['ft2']}\n    parameters: {{weight: 1}}\nmerge_method: linear\n"
    )
    _close(_run(tmp_path, text), [2.5, -1.0, 0.0, 0.35])  # (3 ft1 + ft2) / 4
    summed = _run(tmp_path, text + "parameters: {normalize: false}\n", "summed")
    _close(summed, [10.0, -4.0, 0.0, 1.4])


def test_dare_without_drops_is_task_arithmetic(toys: dict[str, Path], tmp_path: Path) -> None:
    models = _models(toys, "{weight: 1.0}", "{weight: 0.5}")
    text = models + f"merge_method: dare_linear\nbase_model: {toys['base']}\n"
    _close(_run(tmp_path, text), [4.0, -1.0, -0.5, 0.45])  # density 1 by default: ft1 + ft2/2


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_drops_and_rescales_to_the_l1_norm(tmp_path: Path, rescale: bool) -> None:
    """mergekit's DARE keeps each entry with probability ``density`` and, with ``rescale``
    (its default), scales the kept ones back to the task vector's L1 norm."""
    values = [float(v) for v in range(1, 201)]
    base = save_checkpoint(tmp_path / "base", {"w": torch.zeros(200)}, TOY)
    ft = save_checkpoint(tmp_path / "ft", {"w": torch.tensor(values)}, TOY)
    text = (
        f"models:\n  - model: {ft}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
        f"merge_method: dare_ties\nbase_model: {base}\n"
        f"parameters: {{rescale: {str(rescale).lower()}}}\n"
    )
    merged = _run(tmp_path, text)["w"]
    kept = merged != 0
    assert 30 < int(kept.sum()) < 90
    ratio = merged[kept] / torch.tensor(values)[kept]
    expected = sum(values) / float(torch.tensor(values)[kept].sum()) if rescale else 1.0
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected))
    if rescale:
        torch.testing.assert_close(merged.abs().sum(), torch.tensor(sum(values)))


# The toys' task vectors ft1 = [2, -2, 1, 0.5] and ft2 = [4, 2, -3, -0.1]:
# ft1 · ft2 = 8 - 4 - 3 - 0.05 = 0.95, ‖ft1‖² = 9.25, ‖ft2‖² = 29.01.
_COS = 0.95 / math.sqrt(9.25 * 29.01)


def test_model_stock(toys: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"models:\n  - model: {toys['ft1']}\n  - model: {toys['ft2']}\n"
        f"merge_method: model_stock\nbase_model: {toys['base']}\n"
    )
    t = 2 * _COS / (1 + _COS)  # k = 2
    _close(_run(tmp_path, text), [t * 3.0, 0.0, -t, t * 0.2])  # t · mean of the task vectors


def test_nuslerp_with_and_without_a_base(toys: dict[str, Path], tmp_path: Path) -> None:
    omega = math.acos(_COS)
    # weights 1 and 3: t = 3/4
    a, b = math.sin(omega / 4) / math.sin(omega), math.sin(3 * omega / 4) / math.sin(omega)
    expected = [a * x + b * y for x, y in zip([2, -2, 1, 0.5], [4, 2, -3, -0.1], strict=True)]
    models = (
        f"models:\n  - model: {toys['ft1']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {toys['ft2']}\n    parameters: {{weight: 3}}\nmerge_method: nuslerp\n"
    )
    _close(_run(tmp_path, models), expected)
    # the task vectors from a base of 1s: the same slerp, added to the base
    shifted = {
        key: _toy(tmp_path / f"{key}+1", [v + 1 for v in values])
        for key, values in (("ft1", [2, -2, 1, 0.5]), ("ft2", [4, 2, -3, -0.1]))
    }
    base = _toy(tmp_path / "ones", [1.0] * 4)
    text = models.replace(str(toys["ft1"]), str(shifted["ft1"]))
    text = text.replace(str(toys["ft2"]), str(shifted["ft2"])) + f"base_model: {base}\n"
    _close(_run(tmp_path, text, "based"), [v + 1 for v in expected])


def test_della_defaults_drop_nothing_and_elect_signs(toys: dict[str, Path], tmp_path: Path) -> None:
    # mergekit's density 1 drops nothing: TIES at full density, normalized (della's default)
    models = _models(toys, "{weight: 0.5}", "{weight: 0.5}")
    text = models + f"merge_method: della\nbase_model: {toys['base']}\n"
    _close(_run(tmp_path, text), [3.0, 2.0, -3.0, 0.5])
    linear = text.replace("merge_method: della", "merge_method: della_linear")
    _close(_run(tmp_path, linear, "linear"), [3.0, 0.0, -1.0, 0.2])  # the weighted sum
    translated = translate_mergekit_config(
        {
            "merge_method": "della",
            "base_model": str(toys["base"]),
            "models": [{"model": str(toys["ft1"]), "parameters": {"weight": 1, "epsilon": 0.1}}],
        }
    )
    assert translated["models"][0] == {"path": str(toys["ft1"]), "weight": 1.0, "epsilon": 0.1}
    params = translated["parameters"]
    assert params["density"] == 1.0 and params["epsilon"] == 0.15 and params["scale"] == 1.0
    assert params["normalize"] is True and params["rescale"] == "l1"


def test_della_drops_by_rank_and_rescales_to_the_l1_norm(tmp_path: Path) -> None:
    values = [float(v) for v in range(1, 201)]
    base = save_checkpoint(tmp_path / "base", {"w": torch.zeros(200)}, TOY)
    ft = save_checkpoint(tmp_path / "ft", {"w": torch.tensor(values)}, TOY)
    text = (
        f"models:\n  - model: {ft}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.4}}\n"
        f"merge_method: della_linear\nbase_model: {base}\n"
    )
    merged = _run(tmp_path, text)["w"]
    kept = merged != 0
    # keep probabilities 0.1 (smallest) to 0.9 (largest): the top half is kept far more often
    assert int(kept[100:].sum()) > 2 * int(kept[:100].sum())
    torch.testing.assert_close(merged.abs().sum(), torch.tensor(sum(values)))  # rescale: l1


def test_breadcrumbs_and_breadcrumbs_ties(toys: dict[str, Path], tmp_path: Path) -> None:
    # density 0.5, gamma 0.25 on 4 entries: 1 outlier and 1 small entry dropped
    # ft1 [2, -2, 1, .5] -> [0, -2, 1, 0] (the first of the tied 2s is the outlier)
    # ft2 [4, 2, -3, -.1] -> [0, 2, -3, 0]
    models = _models(toys, "{weight: 1.0}", "{weight: 1.0}")
    text = (
        models + f"merge_method: breadcrumbs\nbase_model: {toys['base']}\n"
        "parameters: {density: 0.5, gamma: 0.25}\n"
    )
    _close(_run(tmp_path, text), [0.0, 0.0, -2.0, 0.0])
    # sign election: sums [0, 0, -2, 0]: +, +, -, +; summed (mergekit's normalize: false)
    ties = text.replace("merge_method: breadcrumbs", "merge_method: breadcrumbs_ties")
    _close(_run(tmp_path, ties, "ties"), [0.0, 2.0, -3.0, 0.0])


def test_sce(toys: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"models:\n  - model: {toys['ft1']}\n  - model: {toys['ft2']}\n"
        f"merge_method: sce\nbase_model: {toys['base']}\nparameters: {{int8_mask: true}}\n"
    )
    # weights ‖ft_i‖² / 38.26; sums [6, 0, -2, 0.4]: +, +, -, +; entries 1-3 have one agreeing
    _close(_run(tmp_path, text), [(9.25 * 2 + 29.01 * 4) / 38.26, 2.0, -3.0, 0.5])


def test_new_methods_refuse_what_mergekit_would_not_read(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sce = (
        f"models:\n  - model: {toys['ft1']}\n    parameters: {{weight: 1}}\n"
        f"merge_method: sce\nbase_model: {toys['base']}\n"
    )
    assert "models[0].parameters.weight has no effect on mergekit's sce" in _problems(
        tmp_path, sce, capsys
    )
    nuslerp = (
        f"models: [{{model: {toys['ft1']}}}, {{model: {toys['ft2']}}}]\nmerge_method: nuslerp\n"
    )
    assert "models[0].parameters.weight: mergekit's nuslerp needs a weight" in _problems(
        tmp_path, nuslerp, capsys
    )
    stock = f"models: [{{model: {toys['ft1']}}}]\nmerge_method: model_stock\n"
    err = _problems(tmp_path, stock + "parameters: {filter_wise: 2}\n", capsys)
    assert "base_model: mergekit's model_stock needs a base_model" in err
    assert "parameters.filter_wise=2: expected true or false" in err
    one = stock + f"base_model: {toys['base']}\n"
    assert "model_stock needs at least 2 fine-tuned models" in _problems(tmp_path, one, capsys)
    # density 0.1 with mergekit's default epsilon 0.15: keep probabilities below 0
    della = _models(toys, "{weight: 1, density: 0.1}", "{weight: 1}")
    della += f"merge_method: della\nbase_model: {toys['base']}\n"
    err = _problems(tmp_path, della, capsys)
    assert "models[0], tensor 'model.embed.weight': density=0.1 ± epsilon=0.15" in err


def _slerp_toys(tmp_path: Path) -> tuple[Path, Path]:
    return _toy(tmp_path / "a", [1.0, 0.0]), _toy(tmp_path / "b", [0.0, 1.0])


def _arc(t: float) -> list[float]:
    """slerp of [1, 0] and [0, 1] at t: a quarter circle."""
    return [math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]


def test_slerp_scalar_t_from_the_base(tmp_path: Path) -> None:
    a, b = _slerp_toys(tmp_path)
    text = (
        f"models:\n  - model: {b}\n  - model: {a}\nmerge_method: slerp\nbase_model: {a}\n"
        "parameters: {t: 0.25}\n"
    )
    _close(_run(tmp_path, text), _arc(0.25))  # t = 0 is base_model, whatever the order


def test_slerp_t_gradients_and_filters_across_layers(tmp_path: Path) -> None:
    """mergekit's layer positions: layer i of 3 at i/2; tensors outside the layers at 0."""
    a, b = _slerp_toys(tmp_path)
    text = f"""
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - filter: norm
      value: [0.8, 0.2]
    - value: 0.5
dtype: float32
"""
    merged = _run(tmp_path, text)
    for i in range(3):
        _close(merged, _arc(i / 2), [f"model.layers.{i}.self_attn.weight"])
        _close(merged, _arc(1 - i / 2), [f"model.layers.{i}.mlp.weight"])
    _close(merged, _arc(0.8), ["model.norm.weight"])  # outside the layers: the first value
    _close(merged, _arc(0.5), ["model.embed.weight"])


def test_weight_gradient_across_layers(toys: dict[str, Path], tmp_path: Path) -> None:
    text = (
        f"models:\n  - model: {toys['ft1']}\n    parameters: {{weight: [0, 1]}}\n"
        f"merge_method: task_arithmetic\nbase_model: {toys['base']}\n"
    )
    merged = _run(tmp_path, text)
    ft1 = torch.tensor([2.0, -2.0, 1.0, 0.5])
    for i in range(3):
        torch.testing.assert_close(merged[f"model.layers.{i}.mlp.weight"], ft1 * i / 2)
    torch.testing.assert_close(merged["model.norm.weight"], torch.zeros(4))


def test_a_filter_that_misses_a_tensor_names_it(toys: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "mergekit.yml"
    config.write_text(
        f"models:\n  - model: {toys['ft1']}\n"
        "    parameters: {weight: [{filter: mlp, value: 1.0}]}\n"
        f"merge_method: task_arithmetic\nbase_model: {toys['base']}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.weight: no filter matches tensor"):
        from accord.llm.cli import run_llm_merge

        run_llm_merge(load_llm_merge_config(config, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_translation_uses_mergekit_defaults(toys: dict[str, Path]) -> None:
    data = {
        "merge_method": "dare_ties",
        "base_model": str(toys["base"]),
        "models": [
            {"model": str(toys["base"])},
            {"model": str(toys["ft1"]), "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "parameters": {"int8_mask": True},
        "dtype": "bfloat16",
    }
    translated = translate_mergekit_config(data)
    assert translated["method"] == "dare_ties"
    assert translated["base"] == str(toys["base"])
    assert [m["path"] for m in translated["models"]] == [str(toys["ft1"])]
    model = translated["models"][0]
    assert model["weight"] == 0.5 and model["drop_rate"] == pytest.approx(0.3)
    # DARE-TIES: mergekit sums (normalize false) and rescales to the L1 norm (rescale true)
    params = translated["parameters"]
    assert params["normalize"] is False and params["rescale"] == "l1"
    assert params["drop_rate"] == 0.0 and params["scale"] == 1.0  # density 1, lambda 1
    assert translated["dtype"] == "bfloat16"


def test_dtype_and_out_dtype(toys: dict[str, Path], tmp_path: Path) -> None:
    models = _models(toys, "{weight: 1.0}", "{weight: 1.0}")
    text = models + f"merge_method: task_arithmetic\nbase_model: {toys['base']}\n"
    assert _run(tmp_path, text + "dtype: bfloat16\n")["model.norm.weight"].dtype == torch.bfloat16
    both = _run(tmp_path, text + "dtype: float32\nout_dtype: float16\n", "half")
    assert both["model.norm.weight"].dtype == torch.float16
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["dtype"] == "float16"


def _tokenizer(path: Path, text: str) -> None:
    (path / "tokenizer.json").write_text(text, encoding="utf-8")
    (path / "tokenizer_config.json").write_text("{}", encoding="utf-8")


def test_tokenizer_copied_from_the_base_or_the_source(
    toys: dict[str, Path], tmp_path: Path
) -> None:
    _tokenizer(toys["base"], '{"from": "base"}')
    _tokenizer(toys["ft1"], '{"from": "ft1"}')
    models = _models(toys, "{weight: 1.0}", "{weight: 1.0}")
    text = models + f"merge_method: ties\nbase_model: {toys['base']}\n"
    _run(tmp_path, text, "default")
    assert (tmp_path / "default" / "tokenizer.json").read_text() == '{"from": "base"}'
    _run(tmp_path, text + f"tokenizer_source: {toys['ft1']}\n", "from-ft1")
    assert (tmp_path / "from-ft1" / "tokenizer.json").read_text() == '{"from": "ft1"}'
    assert (tmp_path / "from-ft1" / "tokenizer_config.json").exists()


def test_no_tokenizer_files_no_copy(toys: dict[str, Path], tmp_path: Path) -> None:
    models = _models(toys, "{weight: 1.0}", "{weight: 1.0}")
    _run(tmp_path, models + f"merge_method: ties\nbase_model: {toys['base']}\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "accord-output.json",
        "config.json",
        "model.safetensors",
    ]


def _problems(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    config = tmp_path / "bad.yml"
    config.write_text(text, encoding="utf-8")
    assert accord_main(["llm-merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_unknown_keys_and_methods_are_named_with_a_suggestion(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _problems(
        tmp_path,
        f"models: [{{model: {toys['ft1']}}}]\nmerge_method: ties\nbase_modle: {toys['base']}\n",
        capsys,
    )
    assert "base_modle" in err and "did you mean 'base_model'" in err
    err = _problems(tmp_path, f"models: [{{model: {toys['ft1']}}}]\nmerge_method: tie\n", capsys)
    assert "merge_method: 'tie' is unknown (did you mean 'ties'?)" in err
    err = _problems(
        tmp_path, f"models: [{{model: {toys['ft1']}}}]\nmerge_method: karcher\n", capsys
    )
    assert "mergekit's 'karcher' is not implemented in accord" in err
    text = (
        f"models:\n  - model: {toys['ft1']}\n    parameters: {{weight: 1, densty: 0.5}}\n"
        f"merge_method: ties\nbase_model: {toys['base']}\nparameters: {{t: 0.5, lamda: 2}}\n"
    )
    err = _problems(tmp_path, text, capsys)
    assert "models[0].parameters.densty is not a parameter (did you mean 'density'?)" in err
    assert "parameters.lamda is not a parameter (did you mean 'lambda'?)" in err
    assert "parameters.t has no effect on mergekit's ties" in err


def test_what_accord_does_not_do_is_refused_by_key(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slices = (
        f"slices:\n  - sources:\n      - model: {toys['ft1']}\n        layer_range: [0, 3]\n"
        "merge_method: linear\n"
    )
    assert "slices: layer ranges" in _problems(tmp_path, slices, capsys)
    text = (
        "models:\n  - model: org/some-hub-model\n    parameters: {weight: 1}\n"
        f"merge_method: ties\nbase_model: {toys['base']}\ntokenizer_source: union\n"
        "dtype: float64\n"
    )
    err = _problems(tmp_path, text, capsys)
    assert "tokenizer_source: union" in err and "dtype: 'float64'" in err
    text = text.replace("tokenizer_source: union\ndtype: float64\n", "")
    err = _problems(tmp_path, text, capsys)
    assert "models[0].model: org/some-hub-model is not a directory" in err
    assert "never the Hugging Face hub" in err


def test_mergekit_requirements_are_checked_before_any_weight(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_weight = (
        f"models: [{{model: {toys['ft1']}}}]\nmerge_method: ties\nbase_model: {toys['base']}\n"
    )
    err = _problems(tmp_path, no_weight, capsys)
    assert "models[0].parameters.weight: mergekit's ties needs a weight" in err
    no_base = f"models: [{{model: {toys['ft1']}, parameters: {{weight: 1}}}}]\nmerge_method: ties\n"
    assert "base_model: mergekit's ties needs a base_model" in _problems(tmp_path, no_base, capsys)
    slerp = (
        f"models: [{{model: {toys['ft1']}}}, {{model: {toys['ft2']}}}]\n"
        f"merge_method: slerp\nbase_model: {toys['base']}\n"
    )
    err = _problems(tmp_path, slerp, capsys)
    assert (
        "base_model and one other model, got 2" in err and "parameters.t: mergekit's slerp" in err
    )
    bad_density = no_weight.replace("}]", ", parameters: {weight: 1, density: 1.5}}]")
    assert "models[0].parameters.density=1.5: expected 0 < density <= 1" in _problems(
        tmp_path, bad_density, capsys
    )


def test_out_is_required_for_mergekit_and_overrides_accord_output(
    toys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mergekit = tmp_path / "mk.yml"
    mergekit.write_text(
        f"models: [{{model: {toys['ft1']}, parameters: {{weight: 1}}}}]\nmerge_method: linear\n",
        encoding="utf-8",
    )
    assert accord_main(["llm-merge", str(mergekit), "--quiet"]) == 2
    assert "output: no output folder" in capsys.readouterr().err
    native = tmp_path / "accord.yml"
    native.write_text(
        f"method: linear\nmodels: [{toys['ft1']}]\noutput: {tmp_path / 'named'}\n",
        encoding="utf-8",
    )
    assert accord_main(["llm-merge", str(native), str(tmp_path / "given"), "--quiet"]) == 0
    assert (tmp_path / "given").is_dir() and not (tmp_path / "named").exists()
    assert accord_main(["llm-merge", str(native), "--quiet"]) == 0
    assert (tmp_path / "named").is_dir()
    both = tmp_path / "both.yml"
    both.write_text("method: linear\nmerge_method: linear\nmodels: []\n", encoding="utf-8")
    assert accord_main(["llm-merge", str(both), str(tmp_path / "x"), "--quiet"]) == 2
    assert "both merge_method (mergekit's) and method (accord's)" in capsys.readouterr().err


def test_mergekit_example_config_on_a_real_model(tmp_path: Path) -> None:
    """mergekit's examples/ties.yml (gradients, filters, int8_mask, float16), its models
    replaced by tiny Llama checkpoints: the output loads in transformers."""
    transformers = pytest.importorskip("transformers")
    from accord.llm.testing import tiny_model

    base = tiny_model("llama", seed=0)
    base.save_pretrained(tmp_path / "base")
    for seed in (1, 2, 3):
        model = tiny_model("llama", seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(tmp_path / f"ft{seed}")
    text = f"""
models:
  - model: {tmp_path / "ft1"}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {tmp_path / "ft2"}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {tmp_path / "ft3"}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {tmp_path / "base"}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
    merged = _run(tmp_path, text)
    assert merged["model.norm.weight"].dtype == torch.float16
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.arange(8).reshape(1, 8)).logits
    assert torch.isfinite(logits).all()
