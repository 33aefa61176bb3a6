"""Per-tensor parameter settings as mergekit writes them: numbers, gradients, filters."""

from __future__ import annotations

import pytest

from accord.llm.settings import (
    Filtered,
    layer_positions,
    map_setting,
    parse_setting,
    setting_at,
    setting_numbers,
)


def test_layer_positions_follow_mergekit() -> None:
    names = [
        "transformer.wte.weight",
        *(f"transformer.h.{i}.mlp.c_fc.weight" for i in range(5)),
        "transformer.ln_f.weight",
        "vision.layers.0.proj.weight",  # a stack of one layer sits at 1, as in mergekit
        "model.layers.3.block_sparse_moe.experts.7.w1.weight",  # the first integer is the layer
        "model.layers.0.block_sparse_moe.experts.7.w1.weight",
    ]
    positions = layer_positions(names)
    assert [positions[f"transformer.h.{i}.mlp.c_fc.weight"] for i in range(5)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    assert positions["transformer.wte.weight"] == positions["transformer.ln_f.weight"] == 0.0
    assert positions["vision.layers.0.proj.weight"] == 1.0
    assert positions["model.layers.3.block_sparse_moe.experts.7.w1.weight"] == 1.0
    assert positions["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == 0.0


def test_gradients_interpolate_piecewise_linearly() -> None:
    gradient = parse_setting([0, 1, 0.5])
    # anchors at 0, 1/2, 1
    assert setting_at(gradient, "x", 0.25) == 0.5
    assert setting_at(gradient, "x", 0.75) == 0.75
    assert setting_at(gradient, "x", 1.0) == 0.5
    assert setting_at(parse_setting(0.3), "x", 0.9) == 0.3


def test_filters_take_the_first_match_or_nothing() -> None:
    setting = parse_setting([{"filter": "mlp", "value": [0, 1]}, {"filter": "attn", "value": 2}])
    assert setting_at(setting, "model.layers.1.mlp.up.weight", 0.5) == 0.5
    assert setting_at(setting, "model.layers.1.self_attn.q.weight", 0.5) == 2.0
    assert setting_at(setting, "model.norm.weight", 0.0) is None
    catch_all = parse_setting([{"filter": "*", "value": 4}])
    assert setting_at(catch_all, "anything", 0.0) == 4.0


def test_parsing_and_numbers() -> None:
    assert parse_setting("1e-3") == 0.001  # PyYAML's text for 1e-3, a number to mergekit
    assert parse_setting([1, 2]) == (1.0, 2.0)
    assert parse_setting([{"value": 1}]) == (Filtered(None, 1.0),)
    setting = parse_setting([{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}])
    assert setting_numbers(setting) == [0.2, 0.9, 0.5]
    assert setting_numbers(map_setting(setting, lambda v: 1 - v)) == pytest.approx([0.8, 0.1, 0.5])
    for bad in (True, "lots", [], [1, {"value": 2}], [{"filter": "a"}], [{"vale": 1}]):
        with pytest.raises(ValueError):
            parse_setting(bad)
    with pytest.raises(ValueError, match="did you mean 'value'"):
        parse_setting([{"vaule": 1}])
