"""One checkpoint type: an accord vision checkpoint and a Hugging Face LLM folder open into
:class:`accord.Checkpoint` with a lazy state, and a bad folder is one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import accord
import accord.checkpoint
import accord.llm
from accord.errors import CheckpointError, ModelError, StoreError

TINY = {"width": 8, "depth": 1, "in_channels": 1, "image_size": 4}


def _llm_folder(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A two-shard Hugging Face-style folder (an index and its shards) of small tensors."""
    generator = torch.Generator().manual_seed(0)
    state = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8, generator=generator)
        for i in range(2)
    }
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    accord.llm.save_checkpoint(path, state, config, shard_size=600)
    assert (path / "model.safetensors.index.json").is_file()
    return path, state


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors read through accord.checkpoint's safe_open from now on."""
    reads: list[str] = []
    real = accord.checkpoint.safe_open

    class Recording:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handle = real(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.handle.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self.handle.get_tensor(name)

        def get_slice(self, name: str) -> Any:
            return self.handle.get_slice(name)  # shapes and dtypes: the header only

    monkeypatch.setattr(accord.checkpoint, "safe_open", Recording)
    return reads


def test_vision_and_llm_folders_open_into_one_type_with_lazy_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = accord.build_model("mlp", **TINY)
    accord.save_checkpoint(model, tmp_path / "vision", {"note": 1})
    llm_path, llm_state = _llm_folder(tmp_path / "llm")
    reads = _record_reads(monkeypatch)

    vision = accord.open_checkpoint(tmp_path / "vision")
    llm = accord.llm.open_checkpoint(llm_path)
    assert accord.llm.Checkpoint is accord.Checkpoint
    for checkpoint in (vision, llm):
        assert type(checkpoint) is accord.Checkpoint
        assert isinstance(checkpoint.state, accord.LazyState)
    assert reads == []  # opening reads headers and configs, no tensor

    name = "model.layers.1.mlp.up_proj.weight"
    assert name in llm.state and reads == []
    assert torch.equal(llm.state[name], llm_state[name])
    assert reads == [name]
    assert llm.config["architectures"] == ["LlamaForCausalLM"]
    assert vision.config["note"] == 1 and vision.name == "vision"

    # A vision checkpoint's model is built from its config and weights on first use.
    assert "model" not in vision.__dict__
    built = vision.model
    assert built is vision.model and not built.training
    assert sorted(reads[1:]) == sorted(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], tensor)


def test_other_safetensors_beside_the_weights_are_not_the_model(tmp_path: Path) -> None:
    model = accord.build_model("mlp", **TINY)
    accord.save_checkpoint(model, tmp_path / "m", {})
    save_file({"mean": torch.zeros(3)}, str(tmp_path / "m" / "statistics.safetensors"))
    checkpoint = accord.load_checkpoint(tmp_path / "m")
    assert sorted(checkpoint.state) == sorted(model.state_dict())


def test_a_folder_without_a_zoo_model_has_no_module(tmp_path: Path) -> None:
    llm_path, _ = _llm_folder(tmp_path / "llm")
    with pytest.raises(CheckpointError, match=r"llm/config\.json has no 'model' entry.*user_model"):
        _ = accord.open_checkpoint(llm_path).model


def test_altered_weights_fail_the_digest_check_on_first_use(tmp_path: Path) -> None:
    accord.save_checkpoint(accord.build_model("mlp", **TINY), tmp_path / "m", {})
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the last tensor's last element
    weights.write_bytes(bytes(data))
    checkpoint = accord.open_checkpoint(tmp_path / "m")  # headers only: opens
    for error in (StoreError, ModelError):  # what users of either half catch
        with pytest.raises(error, match=r"model\.safetensors has sha256.*restore the file"):
            _ = checkpoint.model
    with pytest.raises(CheckpointError, match="sha256"):
        accord.load_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("lost", ["model.safetensors", "config.json", "folder"])
def test_a_missing_file_is_named(tmp_path: Path, lost: str) -> None:
    accord.save_checkpoint(accord.build_model("mlp", **TINY), tmp_path / "m", {})
    if lost == "folder":
        missing, expected = tmp_path / "gone", r"gone is not a directory"
    else:
        (tmp_path / "m" / lost).unlink()
        missing = tmp_path / "m"
        expected = {
            "model.safetensors": r"m holds no \*\.safetensors file.*incomplete",
            "config.json": r"m/config\.json does not exist",
        }[lost]
    for read in (accord.open_checkpoint, accord.load_checkpoint, accord.llm.open_checkpoint):
        with pytest.raises(CheckpointError, match=expected) as error:
            read(missing)
        assert str(missing) in str(error.value)


def test_a_broken_config_is_named(tmp_path: Path) -> None:
    llm_path, _ = _llm_folder(tmp_path / "llm")
    (llm_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"llm/config\.json: expected a JSON object"):
        accord.open_checkpoint(llm_path)
