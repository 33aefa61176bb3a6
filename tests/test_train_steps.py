"""Intermediate checkpoints (``--keep-every``) and fine-tuning from a stored checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import accord
from accord.cli import main

TINY = {"width": 16, "depth": 1}


@pytest.fixture(scope="module")
def digits() -> accord.DataSplits:
    return accord.load_dataset("digits")


def _request(**changes) -> accord.ModelSetRequest:
    fields = {
        "arch": "mlp",
        "dataset": "digits",
        "seeds": (0,),
        "model": TINY,
        "train": accord.TrainConfig(epochs=2, batch_size=64),
    }
    fields.update(changes)
    return accord.ModelSetRequest(**fields)


def test_keep_every_parses_steps_and_epochs() -> None:
    assert accord.Keep.parse("50") == accord.Keep(50, "step")
    assert accord.Keep.parse("50s") == accord.Keep(50, "step")
    assert accord.Keep.parse("2e") == accord.Keep(2, "epoch")
    for bad in ("two", "0e", "-3"):
        with pytest.raises(accord.ConfigError, match="keep"):
            accord.Keep.parse(bad)


def test_kept_steps_load_in_order_and_do_not_change_training(
    tmp_path: Path, digits, single_thread
) -> None:
    per_epoch = math.ceil(len(digits.train) / 64)
    kept = accord.train_model_set(
        _request(keep=accord.Keep(7)), tmp_path, progress=False, data=digits
    )[0]
    plain = accord.train_model_set(_request(), tmp_path, progress=False, data=digits)[0]
    assert kept.path != plain.path  # keeping is part of the store key
    steps = accord.training_steps(kept.path)
    expected = list(range(7, 2 * per_epoch, 7))
    assert [accord.load_checkpoint(p).config["progress"]["step"] for p in steps] == [
        *expected,
        2 * per_epoch,
    ]
    assert steps[-1] == kept.path
    assert accord.training_steps(plain.path) == [plain.path]
    first = accord.load_checkpoint(steps[0])
    assert first.config["progress"]["epochs"] == pytest.approx(7 / per_epoch)
    assert first.config["key"] == kept.config["key"]
    # the snapshots are the run's own states: the final model is the plain run's
    for name, tensor in kept.model.state_dict().items():
        torch.testing.assert_close(tensor, plain.model.state_dict()[name])
    assert not torch.allclose(first.model.layers[1].weight, kept.model.layers[1].weight)
    by_epoch = accord.train_model_set(
        _request(keep=accord.Keep(1, "epoch")), tmp_path, progress=False, data=digits
    )[0]
    assert [p.name for p in accord.training_steps(by_epoch.path)[:-1]] == [f"step-{per_epoch:07d}"]


def test_fine_tuning_starts_from_the_stored_checkpoint(tmp_path: Path, digits) -> None:
    base = accord.train_model_set(_request(), tmp_path / "base", progress=False, data=digits)[0]
    no_steps = accord.TrainConfig(epochs=0, batch_size=64)
    same = accord.train_model_set(
        _request(init=str(base.path), train=no_steps, seeds=(3,)),
        tmp_path,
        progress=False,
        data=digits,
    )[0]
    for name, tensor in base.model.state_dict().items():  # zero epochs: the base itself
        torch.testing.assert_close(same.model.state_dict()[name], tensor)
    digest = json.loads((base.path / "config.json").read_text())["weights_sha256"]
    assert same.config["key"]["init"] == {"model.safetensors": digest}
    experts = accord.train_model_set(
        _request(init=str(base.path), split="classes", seeds=(0, 1), keep=accord.Keep(1, "epoch")),
        tmp_path,
        progress=False,
        data=digits,
    )
    assert len({c.path for c in experts}) == 2
    with pytest.raises(accord.ConfigError, match="width"):
        accord.train_model_set(
            _request(init=str(base.path), model={"width": 32}), tmp_path, data=digits
        )


def test_cli_keeps_steps_and_eval_lists_them(tmp_path: Path, capsys) -> None:
    common = ["--arch", "mlp", "--dataset", "digits", "--width", "16", "--depth", "1", "--quiet"]
    assert (
        main(["train", *common, "--seeds", "0", "--epochs", "1", "--store", str(tmp_path / "b")])
        == 0
    )
    base = accord.list_checkpoints(tmp_path / "b")[0]
    args = ["train", *common, "--seeds", "0,1", "--split", "classes", "--epochs", "2"]
    args += ["--init", str(base), "--keep-every", "1e", "--store", str(tmp_path / "e")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "--store", str(tmp_path / "e"), "--steps"]) == 0
    out = capsys.readouterr().out
    assert out.count("/steps/step-") == 2 and "ensemble of 2" in out
