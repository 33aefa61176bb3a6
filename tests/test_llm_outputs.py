"""The output folder of ``merge_checkpoints`` / ``accord llm-merge``: checked before any weight is
read, never an input, overwritten only when accord wrote it as a merge output, replaced whole
even when the writer is killed; and the shard sizes ``save_checkpoint`` takes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import accord.checkpoint  # noqa: E402
import accord.llm.io  # noqa: E402
from accord import _outputs  # noqa: E402
from accord.errors import ConfigError, OutputError  # noqa: E402
from accord.llm import save_checkpoint  # noqa: E402
from accord.llm.cli import llm_merge_main  # noqa: E402
from accord.llm.merge import merge_checkpoints  # noqa: E402
from accord.llm.testing import tiny_model  # noqa: E402
from test_outputs import _hidden, _in_child, _kill_after_first_call, needs_fork  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _save(model: torch.nn.Module, path: Path, **options: int | str) -> Path:
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}
    return save_checkpoint(path, dict(model.state_dict()), config, **options)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, a fine-tuned model and a tokenizer folder, side by side in one folder."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"from": "tokenizer"}', encoding="utf-8")
    (tokenizer / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    return {
        "base": _save(tiny_model("llama", seed=0), root / "base"),
        "ft": _save(tiny_model("llama", seed=1), root / "ft"),
        "tokenizer": tokenizer,
    }


def _merge(inputs: dict[str, Path], out: Path, scale: float = 1.0, **options: bool) -> Path:
    """A task-arithmetic merge in several shards, with an index, a config and tokenizer files."""
    return merge_checkpoints(
        [inputs["ft"]],
        out,
        method="task_arithmetic",
        base=inputs["base"],
        parameters={"scale": scale},
        tokenizer=inputs["tokenizer"],
        shard_size="30KB",
        **options,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refuse_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight file was opened before the output folder was checked")

    monkeypatch.setattr(accord.checkpoint, "safe_open", refuse)


# A bad output: (what makes it, overwrite, what the error must say); ``make(tmp_path, inputs)``
# returns the output path.
_BAD_OUTPUTS: dict[str, tuple[Callable[[Path, dict[str, Path]], Path], bool, str]] = {
    "under a file": (
        lambda tmp, given: _file(tmp / "file") / "out",
        False,
        r"cannot write .*out: .*file is a file, not a folder",
    ),
    "a file": (lambda tmp, given: _file(tmp / "notes.txt"), True, r"notes\.txt is not a folder"),
    "the model": (lambda tmp, given: given["ft"], True, r"ft: it is input model .*ft"),
    "the base": (lambda tmp, given: given["base"], True, r"base: it is input model .*base"),
    "the tokenizer": (
        lambda tmp, given: given["tokenizer"],
        True,
        r"tokenizer: it is input model .*tokenizer",
    ),
    "the inputs' folder": (
        lambda tmp, given: given["ft"].parent,
        True,
        r"it holds input model .*(base|ft|tokenizer)",
    ),
    "inside a model": (
        lambda tmp, given: given["ft"] / "merged",
        True,
        r"merged: it lies inside input model .*ft",
    ),
    "a user's folder": (
        lambda tmp, given: _file(tmp / "mine" / "notes.txt").parent,
        True,
        r"refusing to overwrite .*mine: .*mine has no readable accord-output\.json",
    ),
    "a saved checkpoint": (
        lambda tmp, given: _save(tiny_model("llama", seed=2), tmp / "saved"),
        True,
        r"saved: .*describes a 'hf-checkpoint' folder, not a 'llm-merge-output'",
    ),
    "an output without overwrite": (
        lambda tmp, given: _merge(given, tmp / "merged"),
        False,
        r"merged already exists; choose another output folder, or overwrite it",
    ),
}


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("keep me", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(_BAD_OUTPUTS))
def test_a_bad_output_is_refused_before_any_weight_is_read_and_nothing_changes(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    make, overwrite, message = _BAD_OUTPUTS[case]
    out = make(tmp_path, inputs)
    before = _snapshot(tmp_path), _snapshot(inputs["ft"].parent)
    _refuse_weight_reads(monkeypatch)
    with pytest.raises(OutputError, match=message):
        _merge(inputs, out, overwrite=overwrite)
    assert (_snapshot(tmp_path), _snapshot(inputs["ft"].parent)) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_parent_is_refused_before_any_weight_is_read(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _refuse_weight_reads(monkeypatch)
    try:
        with pytest.raises(OutputError, match=r"folder .*locked is not writable"):
            _merge(inputs, locked / "out")
    finally:
        locked.chmod(0o700)


def test_overwrite_replaces_only_a_merge_output_accord_wrote_whole(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = _merge(inputs, tmp_path / "out")
    manifest = json.loads((out / "accord-output.json").read_text(encoding="utf-8"))
    written = sorted(p.name for p in out.iterdir() if p.name != "accord-output.json")
    assert manifest["kind"] == "llm-merge-output" and manifest["entries"] == written
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(written)
    first = _snapshot(out)
    assert _merge(inputs, out, scale=0.5, overwrite=True) == out
    assert _snapshot(out) == _snapshot(_merge(inputs, tmp_path / "reference", scale=0.5))
    assert _snapshot(out) != first
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    replaced = _snapshot(out)
    with pytest.raises(OutputError, match=r"notes\.txt was not written by accord"):
        _merge(inputs, out, overwrite=True)
    assert _snapshot(out) == replaced
    assert _hidden(tmp_path) == []


@needs_fork
@pytest.mark.parametrize(
    ("owner", "name", "exchange"),
    [
        (accord.llm.io.shutil, "copyfile", True),  # while copying the tokenizer
        (_outputs, "_write_manifests", True),  # the new folder complete, not swapped in
        (_outputs, "_exchange", True),  # just after the swap: the old folder is the leftover
        (os, "rename", False),  # without an exchange: the old folder moved aside
    ],
)
def test_a_killed_overwrite_leaves_the_old_or_the_new_output_whole(
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    name: str,
    exchange: bool,
) -> None:
    out = _merge(inputs, tmp_path / "out")
    old = _snapshot(out)
    new = _snapshot(_merge(inputs, tmp_path / "new", scale=0.5))
    if not exchange:
        monkeypatch.setattr(_outputs, "_exchange", lambda first, second: False)
    assert _in_child(
        lambda: _merge(inputs, out, scale=0.5, overwrite=True), _kill_after_first_call(owner, name)
    )
    assert _hidden(tmp_path) != []
    # The next merge beside it removes the killed writer's leftovers, or puts the old output
    # back when the kill fell between moving it aside and renaming the new one in.
    _merge(inputs, tmp_path / "next")
    assert _hidden(tmp_path) == []
    assert _snapshot(out) in (old, new)
    if name in ("copyfile", "_write_manifests", "rename"):
        assert _snapshot(out) == old


def test_cli_refuses_an_input_as_output_with_the_other_problems_and_overwrites_its_own(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "merge.yaml"
    text = f"""
method: task_arithmetic
base: {inputs["base"]}
models: [{inputs["ft"]}]
tokenizer_source: {inputs["tokenizer"]}
shard_size: 30KB
overwrite: true
"""
    config.write_text(text + "parameters: {density: 0.5}\n", encoding="utf-8")
    before = _snapshot(inputs["base"])
    assert llm_merge_main(config, inputs["base"], progress=False) == 2
    error = capsys.readouterr().err
    assert (
        "density" in error and f"output: refusing to write {inputs['base']}: it is input" in error
    )
    assert _snapshot(inputs["base"]) == before
    config.write_text(text, encoding="utf-8")
    assert llm_merge_main(config, tmp_path / "out", progress=False) == 0
    assert llm_merge_main(config, tmp_path / "out", progress=False) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"from": "tokenizer"}'


def test_save_checkpoint_takes_the_shard_sizes_a_merge_takes(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=0)
    sharded = _save(model, tmp_path / "sharded", shard_size="30KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert _snapshot(sharded) == _snapshot(_save(model, tmp_path / "in-bytes", shard_size=30_000))
    single = _save(model, tmp_path / "single")  # the default, 2GB
    assert sorted(p.name for p in single.iterdir()) == [
        "accord-output.json",
        "config.json",
        "model.safetensors",
    ]
    with pytest.raises(ConfigError, match=r"shard_size: '2XB' is not a size; expected .*500MB"):
        _save(model, tmp_path / "bad", shard_size="2XB")
    assert not (tmp_path / "bad").exists()
