"""Output folders: overwritten only when accord wrote them, replaced whole even when the writer
is killed, leftovers of killed writers cleaned and never taken for models."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import accord
import accord.store
from accord import _outputs
from accord.cli import main

TINY = {"width": 32, "depth": 1, "in_channels": 1, "image_size": 8}

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return accord.build_model("mlp", **TINY)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _in_child(write: Callable[[], object], prepare: Callable[[], object] = lambda: None) -> bool:
    """Run ``prepare()`` then ``write()`` in a forked child; True if the child was SIGKILLed (by
    a hook ``prepare`` installed), False if ``write`` finished. Nothing runs after a kill, as
    with ``kill -9``."""
    with warnings.catch_warnings():  # Python >= 3.12 warns on fork; the child only writes files
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            prepare()
            write()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3), "the writer failed"
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _kill_after_first_call(owner: object, name: str) -> Callable[[], None]:
    """A ``prepare`` for :func:`_in_child`: ``owner.name`` runs once, then the process dies."""

    def install() -> None:
        original = getattr(owner, name)

        def call_then_die(*args: object, **kwargs: object) -> object:
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(owner, name, call_then_die)

    return install


def _note_matching_weights(path: Path, models: dict[int, torch.nn.Module]) -> int:
    """The ``note`` of the checkpoint at ``path``, after checking its weights are that model's."""
    checkpoint = accord.load_checkpoint(path)
    note = checkpoint.config["note"]
    for key, value in models[note].state_dict().items():
        assert torch.equal(checkpoint.model.state_dict()[key], value)
    return note


def test_overwrite_replaces_only_a_folder_accord_wrote_whole(tmp_path: Path) -> None:
    model = _model(0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(accord.OutputError, match=r"mine.*accord-output\.json"):
        accord.save_checkpoint(model, mine, {}, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    # A store (checkpoints, no manifest of its own) is not an output either.
    store = tmp_path / "store"
    accord.save_checkpoint(model, store / "a", {})
    with pytest.raises(accord.OutputError, match="store"):
        accord.save_checkpoint(model, store, {}, overwrite=True)
    assert accord.list_checkpoints(store) == [store / "a"]
    # accord's own checkpoint is replaced, until someone adds a file of theirs to it.
    accord.save_checkpoint(model, store / "a", {"note": 2}, overwrite=True)
    (store / "a" / "notes.txt").write_text("keep me")
    with pytest.raises(accord.OutputError, match=r"notes\.txt was not written by accord"):
        accord.save_checkpoint(model, store / "a", {"note": 3}, overwrite=True)
    assert accord.load_checkpoint(store / "a").config["note"] == 2
    assert (store / "a" / "notes.txt").read_text() == "keep me"


@needs_fork
@pytest.mark.parametrize(
    ("owner", "name"),
    [(accord.store, "save_file"), (os, "replace"), (os, "rename"), (shutil, "rmtree")],
)
def test_a_killed_overwrite_leaves_the_old_or_the_new_folder_whole(
    tmp_path: Path, owner: object, name: str
) -> None:
    models = {1: _model(1), 2: _model(2)}
    target = tmp_path / "m"
    accord.save_checkpoint(models[1], target, {"note": 1})
    _in_child(
        lambda: accord.save_checkpoint(models[2], target, {"note": 2}, overwrite=True),
        _kill_after_first_call(owner, name),
    )
    assert _note_matching_weights(target, models) in (1, 2)
    # The next write beside it removes what the killed writer left.
    accord.save_checkpoint(models[1], tmp_path / "next", {"note": 1})
    assert _hidden(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "next"]


@needs_fork
def test_without_an_atomic_exchange_a_killed_swap_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_outputs, "_exchange", lambda first, second: False)
    models = {1: _model(1), 2: _model(2)}
    target = tmp_path / "m"
    accord.save_checkpoint(models[1], target, {"note": 1})
    assert _in_child(
        lambda: accord.save_checkpoint(models[2], target, {"note": 2}, overwrite=True),
        _kill_after_first_call(os, "rename"),  # the old folder moved aside, the new not yet in
    )
    assert not target.exists() and len(_hidden(tmp_path)) == 2
    _outputs.clean_leftovers(tmp_path)
    assert _note_matching_weights(target, models) == 1
    assert _hidden(tmp_path) == []
    # Without a kill the swap completes.
    accord.save_checkpoint(models[2], target, {"note": 2}, overwrite=True)
    assert _note_matching_weights(target, models) == 2 and _hidden(tmp_path) == []


@needs_fork
def test_a_running_writers_staging_is_left_alone(tmp_path: Path) -> None:
    started, release = os.pipe(), os.pipe()

    def wait_for_release() -> None:
        original = accord.store.save_file

        def save_when_released(*args: object, **kwargs: object) -> None:
            os.write(started[1], b"x")
            os.read(release[0], 1)
            original(*args, **kwargs)

        accord.store.save_file = save_when_released

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        wait_for_release()
        accord.save_checkpoint(_model(1), tmp_path / "slow", {"note": 1})
        os._exit(0)
    os.read(started[0], 1)
    staging = _hidden(tmp_path)
    assert len(staging) == 1
    accord.save_checkpoint(_model(2), tmp_path / "fast", {"note": 2})  # cleans beside it
    assert _hidden(tmp_path) == staging
    os.write(release[1], b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert accord.load_checkpoint(tmp_path / "slow").config["note"] == 1
    assert _hidden(tmp_path) == []


@needs_fork
def test_killed_writers_staging_is_never_a_model_and_training_cleans_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    request = accord.ModelSetRequest(
        arch="mlp",
        dataset="digits",
        seeds=(0,),
        model={"width": 16, "depth": 1},
        train=accord.TrainConfig(epochs=1, batch_size=64),
    )
    (trained,) = accord.train_model_set(request, store, progress=False)
    # A killed writer's staging folder, config.json written, and a hidden copy of a model.
    assert _in_child(
        lambda: accord.save_checkpoint(_model(0), store / "half", {}),
        _kill_after_first_call(os, "replace"),
    )
    shutil.copytree(trained.path, store / ".copy")
    assert accord.list_checkpoints(store) == [trained.path]
    assert main(["eval", "--store", str(store), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ensemble" not in out and ".copy" not in out
    accord.train_model_set(dataclasses.replace(request, seeds=(1,)), store, progress=False)
    assert _hidden(store) == [".copy"]  # the user's hidden folder is not accord's to remove


def test_an_unwritable_store_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    request = accord.ModelSetRequest(
        arch="mlp", dataset="digits", seeds=(0,), model={"width": 16, "depth": 1}
    )
    with pytest.raises(accord.OutputError, match=r"file is a file, not a folder"):
        accord.train_model_set(request, tmp_path / "file" / "store", progress=False)


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    from accord._io import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_read_json_names_the_file_and_the_remedy(tmp_path: Path) -> None:
    from accord._io import read_json, write_json
    from accord.errors import StoreError

    write_json(tmp_path / "ok.json", {"a": 1})
    assert read_json(tmp_path / "ok.json", StoreError) == {"a": 1}
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(StoreError, match=r"bad\.json is not valid JSON \(.*\); retrain"):
        read_json(tmp_path / "bad.json", StoreError, broken="retrain")
    with pytest.raises(StoreError, match=r"gone\.json does not exist; write it first"):
        read_json(tmp_path / "gone.json", StoreError, missing="write it first")
    with pytest.raises(StoreError, match="cannot be read"):
        read_json(tmp_path, StoreError)  # a folder
