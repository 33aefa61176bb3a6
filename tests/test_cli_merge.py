"""`accord merge` end to end on stored models: one method, all methods, YAML configs, errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import accord
from accord import workflow
from accord.cli import main
from accord.config import validate_merge_config


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
    # The folder of all methods is accord's output as a whole: a rerun may replace it.
    assert main([*args, "--quiet", "--overwrite"]) == 0


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


def test_overwrite_refuses_the_store_an_input_and_folders_accord_did_not_write(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    store = Path(stored[0]).parent
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    trained = tmp_path / "trained"
    accord.save_checkpoint(accord.load_checkpoint(stored[0]).model, trained, {})
    refused = {
        store: "holds input model",
        Path(stored[0]): "is input model",
        Path(stored[0]) / "sub": "lies inside input model",
        mine: "accord-output.json",
        trained: "'checkpoint' folder, not a 'merge-output'",
    }
    before = {p: (p / "model.safetensors").read_bytes() for p in map(Path, stored)}
    for out, reason in refused.items():
        args = ["merge", *stored, "--method", "identity", "--out", str(out), "--overwrite"]
        assert main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and reason in err
    assert {p: (p / "model.safetensors").read_bytes() for p in map(Path, stored)} == before
    assert sorted(accord.list_checkpoints(store)) == sorted(map(Path, stored))
    assert (mine / "notes.txt").read_text() == "keep me"
    accord.load_checkpoint(trained)
    # An output accord wrote, once a file of the user's is in it, is refused too.
    out = tmp_path / "merged"
    args = ["merge", *stored, "--method", "identity", "--out", str(out), "--quiet"]
    assert main(args) == 0
    (out / "notes.txt").write_text("keep me")
    assert main([*args, "--overwrite"]) == 2
    assert "notes.txt was not written by accord" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failed_merge_keeps_the_old_output_whole(
    stored: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    args = ["merge", *stored, "--method", "identity", "--out", str(out), "--quiet"]
    assert main(args) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args: object) -> None:
        raise OSError("disk full")

    # report.md is the last file written: everything before it must not be visible yet.
    monkeypatch.setattr(accord.workflow, "write_merge_report", fail)
    with pytest.raises(OSError, match="disk full"):
        main([*args, "--method", "cca", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    with pytest.raises(OSError, match="disk full"):
        main([*args, "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_an_unwritable_output_fails_before_any_work(
    stored: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the merge started before its output was checked")

    monkeypatch.setattr(accord.workflow, "load_checkpoint", no_work)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "merged"
    assert main(["merge", *stored, "--out", str(out), "--quiet"]) == 2
    assert f"cannot write {out}" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["merge", *stored, "--out", str(locked / "merged"), "--quiet"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_an_output_of_null_is_refused_naming_the_key(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    for given in ("null", ""):
        assert main(["merge", *stored, "--out", given, "--quiet"]) == 2
        assert "output (--out)" in capsys.readouterr().err
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"models": stored, "method": "identity", "output": None}))
    assert main(["merge", "--config", str(config), "--quiet"]) == 2
    assert "names no folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [config]


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
        "granularity": "parameter",
        "crop_padding": 0,
        "schedule": "constant",
    }
    for option, message in (
        ("ridge", "--option 'ridge': expected KEY=VALUE"),
        ("rige=0.1", "has no option 'rige' (did you mean 'ridge'?)"),
        ("ridge=abc", "--option ridge=abc: ridge takes a number (default 1.0)"),
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


def test_align_and_combine_flags_name_the_two_methods(
    stored: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "soup"
    args = ["merge", *stored, "--align", "permutation", "--combine", "linear", "--out", str(out)]
    assert main([*args, "--option", "weight=2", "--samples", "200", "--quiet"]) == 0
    assert "merge: permutation+linear" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (report["alignment"], report["combine"]) == ("permutation", "linear")
    assert report["combine_options"] == {"weight": 2.0, "normalize": True}
    assert main(["merge", *stored, "--combine", "ties", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "'ties'" in error and "--base PATH" in error
    assert main(["merge", *stored, "--method", "all", "--align", "cca"]) == 2
    assert "give neither" in capsys.readouterr().err


def test_base_gives_task_vectors_their_origin(stored: list[str], tmp_path: Path, capsys) -> None:
    """Model 0 as the base: task arithmetic at scale 1 gives θ0 + (θ1 − θ0) = θ1 exactly, and
    TIES what merge_state_dicts gives the same states and base."""
    states = [accord.load_checkpoint(p).model.state_dict() for p in stored]
    given = ["--align", "identity", "--base", stored[0], "--repair", "none", "--quiet"]
    out = tmp_path / "ta"
    assert main(["merge", *stored, "--combine", "task_arithmetic", *given, "--out", str(out)]) == 0
    merged = accord.load_checkpoint(out).model.state_dict()
    for name, tensor in states[1].items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "report.json").read_text())["config"]["base"] == stored[0]
    out = tmp_path / "ties"
    args = ["merge", *stored, "--method", "ties", "--option", "density=0.5", *given]
    assert main([*args, "--out", str(out)]) == 0
    expected = accord.merge_state_dicts(states, "ties", base=states[0], density=0.5)
    merged = accord.load_checkpoint(out).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    # chosen on validation: the base reaches every candidate
    assert main(["merge", *stored, "--method", "ties", *given, "--auto"]) == 0
    assert "merge: ties" in capsys.readouterr().out
    # a YAML config names it as base
    config = tmp_path / "merge.yaml"
    keys = {"models": stored, "combine": "ties", "align": "identity", "base": stored[0]}
    config.write_text(yaml.safe_dump({**keys, "repair": "none"}))
    assert main(["merge", "--config", str(config), "--quiet"]) == 0


def test_method_all_with_a_base_adds_the_task_vector_combiners(stored: list[str], capsys) -> None:
    args = ["merge", *stored, "--method", "all", "--base", stored[0], "--samples", "200"]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("cca", "npmerge", *workflow.task_vector_combiners(2)):
        assert f"merge: {name}" in out


def test_base_errors_name_the_file(stored: list[str], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nothing"
    assert main(["merge", *stored, "--combine", "ties", "--base", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    other = tmp_path / "wide"
    model = accord.load_checkpoint(stored[0]).model
    wider = accord.build_model(**{**accord.model_config(model), "width": 16})
    accord.save_checkpoint(wider, other, {})
    assert main(["merge", *stored, "--combine", "ties", "--base", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the base ({other})" in err and "shape" in err
    assert main(["merge", *stored, "--method", "cca", "--base", stored[0]]) == 2
    err = capsys.readouterr().err
    assert "takes no base" in err and "ties" in err
    out = tmp_path / "merged"
    args = ["merge", *stored, "--combine", "ties", "--base", str(out), "--out", str(out)]
    assert main([*args, "--align", "identity", "--quiet"]) == 2
    assert "is input model" in capsys.readouterr().err


def test_an_option_out_of_its_range_fails_before_any_work_on_every_path(
    stored: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """--option, a YAML config's options (align/combine among them), run_merge and the user
    models' merge: each refuses the value naming the method, option, value, range and why,
    before a checkpoint is loaded or a statistics pass starts."""
    from accord.models import merging

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the merge started before its options were checked")

    for module, name in (
        (workflow, "load_checkpoint"),
        (workflow, "collect_statistics"),
        (merging, "load_user_model"),
    ):
        monkeypatch.setattr(module, name, no_work)
    zipit = "method 'zipit': alpha=1.5: expected 0 <= alpha <= 1 (it discounts a repeated match"
    assert main(["merge", *stored, "--method", "zipit", "--option", "alpha=1.5", "--quiet"]) == 2
    assert f"--option: {zipit}" in capsys.readouterr().err
    ridge = "method 'gcca': ridge=-1: expected 0 < ridge (it is added to the covariances'"
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"models": stored, "options": {"align": "gcca", "ridge": -1}}))
    assert main(["merge", "--config", str(config), "--quiet"]) == 2
    assert ridge in capsys.readouterr().err
    density = "method 'ties': density=1.5: expected 0 < density <= 1 (it is the share"
    given = {"models": stored, "combine": "ties", "base": stored[0], "options": {"density": 1.5}}
    with pytest.raises(accord.MergeError, match=re.escape(density)):
        accord.run_merge(validate_merge_config(given))
    with pytest.raises(accord.MergeError, match=re.escape(zipit)):
        merging.run_user_merge(
            validate_merge_config(
                {"models": stored, "model": "pkg:Net", "method": "zipit", "options": {"alpha": 1.5}}
            )
        )
