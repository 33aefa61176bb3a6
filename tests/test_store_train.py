"""Checkpoints, the model store, seeded training, evaluation and the command line."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import accord
from accord.cli import main
from accord.data import random_crops
from accord.evaluate import interpolate_states
from accord.train import _store_key, warmup_then_decay

TINY = {"width": 16, "depth": 1}


@pytest.fixture(scope="module")
def digits() -> accord.DataSplits:
    return accord.load_dataset("digits")


def _request(seeds=(0, 1), **changes) -> accord.ModelSetRequest:
    fields = {
        "arch": "mlp",
        "dataset": "digits",
        "seeds": seeds,
        "model": TINY,
        "train": accord.TrainConfig(epochs=2, batch_size=64),
    }
    fields.update(changes)
    return accord.ModelSetRequest(**fields)


def test_schedule_rises_then_falls_to_zero() -> None:
    factor = warmup_then_decay(100, 0.1)
    values = [factor(step) for step in range(100)]
    assert values[0] == pytest.approx(0.1)
    assert max(values) == pytest.approx(1.0)
    assert values.index(1.0) == 9
    assert values[-1] == pytest.approx(1 / 90)
    assert all(a <= b for a, b in pairwise(values[:10]))
    assert all(a >= b for a, b in pairwise(values[9:]))


def test_random_crops_are_shifted_windows_of_the_padded_image() -> None:
    images = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    generator = torch.Generator().manual_seed(0)
    assert random_crops(images, 0, generator, fill) is images
    padded = fill.view(1, 3, 1, 1).expand(2, 3, 9, 10).clone()
    padded[:, :, 2:7, 2:8] = images
    seen = []
    for _ in range(6):
        crops = random_crops(images, 2, generator, fill)
        assert crops.shape == images.shape
        for crop, window in zip(crops, padded, strict=True):
            shifts = [
                (top, left)
                for top in range(5)
                for left in range(5)
                if torch.equal(crop, window[:, top : top + 5, left : left + 6])
            ]
            assert len(shifts) == 1
            seen.append(shifts[0])
    assert len(set(seen)) > 3  # the shift is drawn per image and per batch
    with pytest.raises(accord.ConfigError, match="crop padding -1"):
        accord.TrainConfig(crop_padding=-1)


def test_crop_padding_enters_the_store_key_only_when_asked_for() -> None:
    config = {"name": "mlp", **TINY}
    plain = _store_key(_request(seeds=(0,)), config, 0, 0, None)
    assert set(plain["train"]) == {
        "epochs", "lr", "batch_size", "momentum", "weight_decay", "warmup"
    }  # fmt: skip
    cropped = _request(
        seeds=(0,), train=accord.TrainConfig(epochs=2, batch_size=64, crop_padding=2)
    )
    key = _store_key(cropped, config, 0, 0, None)
    assert key["train"] == {**plain["train"], "crop_padding": 2}


def test_train_set_writes_loadable_models_and_reuses_them(tmp_path: Path, digits) -> None:
    first = accord.train_model_set(_request(), tmp_path, progress=False, data=digits)
    assert len(first) == 2 and first[0].path != first[1].path
    for checkpoint in first:
        config = json.loads((checkpoint.path / "config.json").read_text())
        assert config["model"]["name"] == "mlp" and config["key"]["dataset"] == "digits"
        assert 0.5 < config["metrics"]["test_accuracy"] <= 1.0
        reloaded = accord.load_checkpoint(checkpoint.path)
        for key, value in checkpoint.model.state_dict().items():
            assert torch.equal(reloaded.model.state_dict()[key], value)
    mtimes = [(c.path / "model.safetensors").stat().st_mtime_ns for c in first]
    again = accord.train_model_set(_request(), tmp_path, progress=False, data=digits)
    assert [(c.path / "model.safetensors").stat().st_mtime_ns for c in again] == mtimes
    # Different seeds give different models; the same seed trains identically.
    w0, w1 = (c.model.state_dict()["layers.1.weight"] for c in first)
    assert not torch.equal(w0, w1)
    other_store = accord.train_model_set(
        _request(seeds=(0,)), tmp_path / "other", progress=False, data=digits
    )
    assert torch.equal(other_store[0].model.state_dict()["layers.1.weight"], w0)


def test_split_modes_give_each_model_its_part(tmp_path: Path, digits) -> None:
    checkpoints = accord.train_model_set(
        _request(split="classes"), tmp_path, progress=False, data=digits
    )
    parts = [c.config["key"]["split"]["part"] for c in checkpoints]
    assert parts == [0, 1]
    # Each model saw only half the classes, so neither reaches the iid accuracy on all.
    assert all(c.config["metrics"]["test_accuracy"] < 0.7 for c in checkpoints)


def test_store_entry_with_mismatched_weights_is_reported(tmp_path: Path, digits) -> None:
    (checkpoint,) = accord.train_model_set(
        _request(seeds=(0,)), tmp_path, progress=False, data=digits
    )
    state = {k: v.clone() for k, v in checkpoint.model.state_dict().items()}
    state["layers.1.weight"] = torch.zeros(3, 3)
    save_file(state, str(checkpoint.path / "model.safetensors"))
    with pytest.raises(accord.StoreError, match=r"layers\.1\.weight"):
        accord.train_model_set(_request(seeds=(0,)), tmp_path, progress=False, data=digits)
    (checkpoint.path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(accord.StoreError, match=r"model\.safetensors"):
        accord.load_checkpoint(checkpoint.path)


def test_save_checkpoint_refuses_existing_and_leaves_no_partial(tmp_path: Path) -> None:
    model = accord.build_model("mlp", **TINY)
    accord.save_checkpoint(model, tmp_path / "m", {"note": 1})
    with pytest.raises(accord.StoreError, match="already exists"):
        accord.save_checkpoint(model, tmp_path / "m", {})
    accord.save_checkpoint(model, tmp_path / "m", {"note": 2}, overwrite=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["note"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_altered_weights_are_refused_and_checkpoints_without_a_digest_still_load(
    tmp_path: Path,
) -> None:
    accord.save_checkpoint(accord.build_model("mlp", **TINY), tmp_path / "m", {})
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the header: tensor bytes
    assert len(data) - start > 3000
    data[start + 1000 : start + 2000] = bytes(1000)
    weights.write_bytes(bytes(data))
    with pytest.raises(accord.StoreError, match=r"model\.safetensors has sha256.*delete"):
        accord.load_checkpoint(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["weights_sha256"]  # as written before accord recorded it
    config_path.write_text(json.dumps(config))
    accord.load_checkpoint(tmp_path / "m")


def test_checkpoints_of_different_data_are_refused_by_name(tmp_path: Path) -> None:
    checkpoints = [
        accord.Checkpoint(
            tmp_path / name, {"key": {"dataset": "digits", "limit": limit}}, accord.LazyState({})
        )
        for name, limit in (("small", 100), ("large", 200))
    ]
    with pytest.raises(accord.StoreError, match=r"one size limit.*small.*limit 100.*limit 200"):
        accord.checkpoint_dataset(checkpoints)


def test_ensemble_and_interpolation(digits) -> None:
    torch.manual_seed(0)
    models = [accord.build_model("mlp", in_channels=1, image_size=8, **TINY) for _ in range(2)]
    ensemble = accord.evaluate_ensemble(models, digits.test)
    logits = (models[0](digits.test.images) + models[1](digits.test.images)) / 2
    expected = (logits.argmax(1) == digits.test.labels).float().mean().item()
    assert ensemble.accuracy == pytest.approx(expected)
    each, joint = accord.evaluate_with_ensemble(models, digits.test)
    assert joint.accuracy == pytest.approx(ensemble.accuracy)
    assert joint.loss == pytest.approx(ensemble.loss, rel=1e-5)
    for model, evaluation in zip(models, each, strict=True):
        alone = accord.evaluate(model, digits.test)
        assert evaluation.accuracy == pytest.approx(alone.accuracy)
        assert evaluation.loss == pytest.approx(alone.loss, rel=1e-5)
    curve = accord.interpolation_curve(models[0], models[1], digits.test, steps=3)
    assert curve.alphas == [0.0, 0.5, 1.0]
    assert curve.evaluations[0] == accord.evaluate(models[0], digits.test)
    mid = interpolate_states(models[0].state_dict(), models[1].state_dict(), 0.5)
    avg = (
        models[0].state_dict()["layers.1.weight"] + models[1].state_dict()["layers.1.weight"]
    ) / 2
    assert torch.allclose(mid["layers.1.weight"], avg)
    line = (curve.losses[0] + curve.losses[2]) / 2
    assert curve.loss_barrier == pytest.approx(max(0.0, curve.losses[1] - line))


def test_cli_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "spec", "merge", "demo", "analyze", "bench", "llm-merge"):
        assert command in out


def test_cli_train_then_eval(tmp_path: Path, capsys) -> None:
    args = [
        "train",
        "--arch",
        "mlp",
        "--dataset",
        "digits",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--model-option",
        "width=16",
        "--depth",
        "1",
        "--store",
        str(tmp_path),
        "--quiet",
    ]
    assert main(args) == 0
    assert len(accord.list_checkpoints(tmp_path)) == 2
    assert main(["eval", "--store", str(tmp_path)]) == 0
    assert "ensemble of 2" in capsys.readouterr().out


def test_diverging_training_stops_with_a_clear_error(digits) -> None:
    model = accord.build_model("mlp", in_channels=1, image_size=8, num_classes=10, **TINY)
    with pytest.raises(accord.ConfigError, match="diverged at step"):
        accord.train_model(model, digits, None, accord.TrainConfig(epochs=2, lr=1e6), seed=0)


def test_cli_trains_on_random_crops(tmp_path: Path, digits) -> None:
    args = ["train", "--arch", "mlp", "--dataset", "digits", "--seeds", "0", "--epochs", "1"]
    args += ["--width", "16", "--depth", "1", "--store", str(tmp_path), "--quiet"]
    assert main([*args, "--crop-padding", "2"]) == 0
    cropped = accord.load_checkpoint(accord.list_checkpoints(tmp_path)[0])
    assert cropped.config["key"]["train"]["crop_padding"] == 2
    plain = _request(seeds=(0,), train=accord.TrainConfig(epochs=1))
    (uncropped,) = accord.train_model_set(plain, tmp_path, progress=False, data=digits)
    assert uncropped.path != cropped.path
    assert "crop_padding" not in uncropped.config["key"]["train"]
    weights = [c.model.state_dict()["layers.1.weight"] for c in (cropped, uncropped)]
    assert not torch.allclose(*weights, atol=1e-3)  # same seed and order: the crops changed it


def test_cli_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    assert (
        main(["train", "--arch", "resnet2O", "--dataset", "digits", "--store", str(tmp_path)]) == 2
    )
    assert "resnet20" in capsys.readouterr().err
    assert main(["train", "--arch", "mlp", "--dataset", "cifar11", "--store", str(tmp_path)]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert main(["eval", "--store", str(tmp_path / "missing")]) == 2
    assert "accord train" in capsys.readouterr().err
