"""`accord merge` end to end on stored models: one method, all methods, YAML configs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import accord
from accord.cli import main


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    store = tmp_path_factory.mktemp("store")
    request = accord.ModelSetRequest(
        arch="mlp",
        dataset="digits",
        seeds=(0, 1),
        model={"width": 32, "depth": 1},
        train=accord.TrainConfig(epochs=3, batch_size=64),
    )
    return [str(c.path) for c in accord.train_model_set(request, store, progress=False)]


def test_merge_writes_a_loadable_checkpoint_and_report(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "merged"
    args = ["merge", *stored, "--method", "cca", "--option", "ridge=0.5", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert "merge: cca" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "cca" and report["options"]["ridge"] == 0.5
    assert set(report["timings"]) >= {"match", "apply", "repair"}
    assert 0.0 <= report["accuracy"]["merged"]["test"] <= 1.0
    assert report["spaces"]["layers.1"]["models"]["1"]["mean_canonical_correlation"] > 0
    assert "## Accuracy" in (out / "report.md").read_text()
    assert (out / "spectra.png").stat().st_size > 0
    merged = accord.load_checkpoint(out)
    assert merged.config["metrics"]["test_accuracy"] == report["accuracy"]["merged"]["test"]
    assert main(["eval", str(out), "--quiet"]) == 0
    # An existing output is refused, then replaced with --overwrite.
    assert main([*args, "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--quiet", "--overwrite"]) == 0


def test_merge_all_methods_prints_one_table(stored: list[str], tmp_path: Path, capsys) -> None:
    args = ["merge", *stored, "--method", "all", "--samples", "500", "--out", str(tmp_path / "o")]
    assert main([*args, "--quiet"]) == 0
    assert (tmp_path / "o" / "npmerge" / "npmerge-coefficients.png").stat().st_size > 0
    out = capsys.readouterr().out
    for row in ("base model 0", "ensemble of 2", "merge: identity", "merge: cca", "merge: npmerge"):
        assert row in out


def test_yaml_config_and_errors_name_the_key(stored: list[str], tmp_path: Path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"models": stored, "method": "permutation", "samples": 300}))
    assert main(["merge", "--config", str(config), "--quiet"]) == 0
    config.write_text(yaml.safe_dump({"models": stored, "methd": "cca"}))
    assert main(["merge", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "methd" in err and "did you mean 'method'" in err
    config.write_text(yaml.safe_dump({"models": stored, "repair": "sometimes"}))
    assert main(["merge", "--config", str(config)]) == 2
    assert "repair" in capsys.readouterr().err
    assert main(["merge", *stored, "--method", "cac"]) == 2
    assert "did you mean 'cca'" in capsys.readouterr().err


def test_options_are_parsed_by_the_types_of_the_method_options(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "np"
    options = ["align=permutation", "loss=kl", "epochs=0", "max_samples=null", "lr=1"]
    args = ["merge", *stored, "--method", "npmerge", "--samples", "200", "--out", str(out)]
    assert main([*args, *(f"--option={o}" for o in options), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["alignment"] == "permutation"
    assert report["npmerge"]["options"] == {
        "loss": "kl",
        "scheme": "joint",
        "epochs": 0,
        "lr": 1.0,
        "max_samples": None,
    }
    for option, message in (
        ("ridge", "--option 'ridge': expected KEY=VALUE"),
        ("rige=0.1", "has no option 'rige' (did you mean 'ridge'?)"),
        ("ridge=abc", "--option ridge=abc: ridge takes a number (default 0.1)"),
    ):
        assert main(["merge", *stored, "--method", "cca", "--option", option]) == 2
        err = capsys.readouterr().err
        assert message in err and "--model-option" not in err


def test_merging_two_architectures_names_their_classes(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    request = accord.ModelSetRequest(
        arch="vgg11",
        dataset="digits",
        seeds=(0,),
        model={"width": 0.0625},
        train=accord.TrainConfig(epochs=1, batch_size=64),
        limit=200,
    )
    (vgg,) = accord.train_model_set(request, tmp_path / "store", progress=False)
    assert main(["merge", stored[0], str(vgg.path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"model 1 ({vgg.path}) is a VGG11, model 0 ({stored[0]}) a MLP" in err
