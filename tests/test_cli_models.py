"""`accord spec` and `accord merge` on models users bring: Hugging Face model folders (tiny
random configs written with save_pretrained) and their own nn.Module class by import path with
.safetensors or .pt weights. A model merged with its permuted twin comes back: the written
folder loads with from_pretrained and gives the original's logits."""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import accord
from _hf_models import BUILDERS, VOCAB, transformers
from accord.cli import main
from accord.models.hf import HFOutput


def _twins(name: str, root: Path) -> tuple[Path, Path, nn.Module, torch.Tensor]:
    """A model's folder, its permuted twin's folder, the wrapped model and an input batch."""
    torch.manual_seed(0)
    model, inputs = BUILDERS[name]()
    wrapped = HFOutput(model.eval(), "logits").eval()
    x = inputs(4)
    spec = accord.trace(wrapped, x[:2])
    twin = accord.randomly_permuted(wrapped, spec, seed=1)
    first, second = root / f"{name}-a", root / f"{name}-b"
    model.save_pretrained(first)
    twin.model.save_pretrained(second)
    return first, second, wrapped, x


def _logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    with torch.no_grad():
        return cls.from_pretrained(folder, local_files_only=True).eval()(x).logits


@pytest.mark.parametrize(
    ("name", "data", "method"),
    [
        ("vit", "digits", "cca"),
        ("bert", "random-tokens", "permutation"),
        ("llama", "tokens.json", "cca"),
    ],
)
def test_hf_folder_merged_with_its_twin_comes_back(
    name: str, data: str, method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, wrapped, x = _twins(name, tmp_path)
    assert main(["spec", str(first)]) == 0
    assert "free" in capsys.readouterr().out
    if data.endswith(".json"):
        ids = torch.randint(0, VOCAB, (40, 8), generator=torch.Generator().manual_seed(2))
        data = str(tmp_path / data)
        Path(data).write_text(json.dumps(ids.tolist()))
    out = tmp_path / "merged"
    args = ["merge", str(first), str(second), "--method", method, "--data", data]
    args += ["--samples", "32", "--batch-size", "16", "--repair", "none", "--out", str(out)]
    with warnings_of(data):
        assert main([*args, "--quiet"]) == 0
    table = capsys.readouterr().out
    assert f"merge: {method}" in table and "agreement" in table
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (first / "config.json").read_text()
    )
    with torch.no_grad():
        expected = wrapped(x)
    torch.testing.assert_close(_logits(out, x), expected, rtol=1e-4, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["agreement_with_ensemble"]["merged"] == 1.0
    if name == "vit":  # an existing output is refused, then replaced with --overwrite
        assert main([*args, "--quiet"]) == 2
        assert "exists" in capsys.readouterr().err
        assert main([*args, "--quiet", "--overwrite"]) == 0
        assert main([*args, "--quiet", "--out", str(first), "--overwrite"]) == 2
        assert "input model" in capsys.readouterr().err


def warnings_of(data: str) -> Any:
    """random-tokens warns that it is a smoke test; other data does not."""
    if data == "random-tokens":
        return pytest.warns(UserWarning, match="smoke test only")
    return contextlib.nullcontext()


def test_merge_writes_tokenizer_files_and_keeps_the_dtype(tmp_path: Path) -> None:
    first, second, _, _ = _twins("llama", tmp_path)
    for folder in (first, second):
        model = transformers.LlamaForCausalLM.from_pretrained(folder).to(torch.bfloat16)
        model.save_pretrained(folder)
    (first / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "merged"
    args = ["merge", str(first), str(second), "--method", "permutation", "--data"]
    args += ["random-tokens", "--samples", "8", "--repair", "none", "--out", str(out), "--quiet"]
    with pytest.warns(UserWarning, match="smoke test only"):
        assert main(args) == 0
    assert (out / "tokenizer_config.json").read_text() == "{}"
    merged = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    assert next(merged.parameters()).dtype == torch.bfloat16


NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4 * width, 3, padding=1)
            self.hidden = nn.Linear(4 * width * 64, 16)
            self.out = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).flatten(1)
            return self.out(torch.relu(self.hidden(h)))


    class Flat(nn.Module):  # reads flat inputs: digits' 8x8 images as 64 numbers

        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(64, 16)
            self.out = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(x)))
    """
)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[nn.Module]:
    """``tests_pkg.module:Net`` importable, as a user's package on PYTHONPATH is."""
    package = tmp_path / "src" / "tests_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "module.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield __import__("tests_pkg.module", fromlist=["Net"]).Net
    for name in ("tests_pkg.module", "tests_pkg"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_own_class_merged_with_its_twin_comes_back(
    suffix: str,
    user_package: type[nn.Module],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = user_package(width=2).eval()
    x = torch.randn(8, 1, 8, 8)
    spec = accord.trace(model, x[:2])
    twin = accord.randomly_permuted(model, spec, seed=1)
    files = [tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"]
    for module, file in zip((model, twin), files, strict=True):
        if suffix == ".pt":
            torch.save(module.state_dict(), file)
        else:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(file))
    given = ["--model", "tests_pkg.module:Net", "--model-args", '{"width": 2}']
    assert main(["spec", str(files[0]), *given, "--input-shape", "1,8,8"]) == 0
    assert "free" in capsys.readouterr().out
    out = tmp_path / "merged"
    exported, export = [], torch.export.export
    monkeypatch.setattr(
        torch.export, "export", lambda m, *a, **k: exported.append(m) or export(m, *a, **k)
    )
    args = ["merge", *map(str, files), *given, "--method", "cca", "--data", "digits"]
    assert main([*args, "--samples", "200", "--out", str(out), "--quiet"]) == 0
    assert len(exported) == 1  # the trace and the merge's statistics share one export
    assert json.loads((out / "model.json").read_text()) == {
        "model": "tests_pkg.module:Net",
        "model_args": {"width": 2},
    }
    merged = accord.load_user_model(out / "model.safetensors", "tests_pkg.module:Net", {"width": 2})
    with torch.no_grad():
        torch.testing.assert_close(merged.module(x), model(x), rtol=1e-4, atol=1e-5)
    # the first file as the base: the twin aligned to it leaves no task vector, so TIES
    # returns the base
    args = ["merge", *map(str, files), *given, "--align", "permutation", "--combine", "ties"]
    args += ["--base", str(files[0]), "--data", "digits", "--samples", "64", "--repair", "none"]
    assert main([*args, "--out", str(tmp_path / "ties"), "--quiet"]) == 0
    merged = accord.load_user_model(
        tmp_path / "ties" / "model.safetensors", "tests_pkg.module:Net", {"width": 2}
    )
    with torch.no_grad():
        torch.testing.assert_close(merged.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert main([*args[:-2], "--base", str(tmp_path)]) == 2
    assert f"base {tmp_path} is a folder" in capsys.readouterr().err


def test_errors_name_the_file_and_the_fix(
    user_package: type[nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert main(["spec", str(folder)]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForThings"]}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["spec", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "'NoSuchForThings' is not a model class of transformers" in err
    with pytest.raises(accord.ModelError, match=r"has no config\.json"):
        accord.load_user_model(tmp_path)
    weights = tmp_path / "w.pt"
    state = user_package(width=1).state_dict()
    torch.save({"extra.weight": torch.zeros(1), **state}, weights)
    given = ["--model", "tests_pkg.module:Net", "--input-shape", "1,8,8"]
    assert main(["spec", str(weights), *given]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "unexpected key 'extra.weight'" in err
    torch.save(state, weights)
    assert main(["spec", str(weights), *given, "--model-args", '{"width": 2}']) == 2
    assert "'conv.weight' has shape" in capsys.readouterr().err
    assert (
        main(["spec", str(weights), "--model", "tests_pkg.nothing:Net", "--input-shape", "1"]) == 2
    )
    assert "does not import" in capsys.readouterr().err
    assert main(["spec", "--model", "tests_pkg.module:Net", "--input-shape", "1,8,8"]) == 0
    torch.save({"state_dict": state, "epoch": 3}, weights)  # a training loop's checkpoint
    assert main(["spec", str(weights), *given]) == 0


def test_folder_whose_weights_miss_a_tensor_names_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    BUILDERS["bert"]()[0].save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    dropped = "bert.encoder.layer.0.output.dense.weight"
    del state[dropped]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(accord.ModelError, match=f"missing tensor '{dropped}'"):
        accord.load_user_model(tmp_path)


def test_text_model_without_data_is_told_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, _, _ = _twins("bert", tmp_path)
    assert main(["merge", str(first), str(second), "--method", "permutation"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "random-tokens" in err
    assert main(["merge", str(first), str(tmp_path), "--method", "permutation"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_text_file_is_tokenized_with_the_folders_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from accord.models.inputs import calibration_batches

    first, _, _, _ = _twins("llama", tmp_path)
    words = ["the", "cat", "sat", "on", "mat", "[UNK]"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(first)
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat " * 3 + "dog")
    model = accord.load_user_model(first)
    batches = calibration_batches(str(text), model, None, 2, sequence_length=4)
    ids = torch.cat([b[0] for b in batches])
    expected = torch.tensor([0, 1, 2, 3, 0, 4] * 3 + [5])[:16].view(4, 4)
    torch.testing.assert_close(ids, expected)
    with pytest.raises(accord.DataError, match="fewer than one sequence"):
        calibration_batches(str(text), model, None, 2, sequence_length=20)


def test_hf_base_folder_gives_task_vectors_their_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first folder as the base: its permuted twin aligned to it leaves no task vector,
    so task arithmetic returns the base, written as a folder with its logits."""
    first, second, wrapped, x = _twins("bert", tmp_path)
    out = tmp_path / "merged"
    args = ["merge", str(first), str(second), "--align", "permutation"]
    args += ["--combine", "task_arithmetic", "--data", "random-tokens", "--samples", "48"]
    args += ["--repair", "none", "--quiet"]
    with pytest.warns(UserWarning, match="smoke test only"):
        assert main([*args, "--base", str(first), "--out", str(out)]) == 0
    with torch.no_grad():
        expected = wrapped(x)
    torch.testing.assert_close(_logits(out, x), expected, rtol=1e-4, atol=1e-5)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert main([*args, "--base", str(weights)]) == 2
    assert f"base {weights} is not a Hugging Face model folder" in capsys.readouterr().err


def test_input_shape_traces_a_class_on_it_and_fits_the_data(
    user_package: type[nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A class that reads flat inputs: --input-shape 64 traces it on 64 numbers and flattens
    digits' 1x8x8 images to them; shapes it cannot run on, or the data cannot fit, are named."""
    from accord.models.inputs import fit_input

    flat = sys.modules["tests_pkg.module"].Flat
    torch.manual_seed(0)
    model = flat().eval()
    x = torch.randn(8, 64)
    twin = accord.randomly_permuted(model, accord.trace(model, x[:2]), seed=1)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for module, file in zip((model, twin), files, strict=True):
        save_file(dict(module.state_dict()), str(file))
    out = tmp_path / "merged"
    args = ["merge", *map(str, files), "--model", "tests_pkg.module:Flat", "--data", "digits"]
    args += ["--method", "permutation", "--samples", "64", "--repair", "none", "--quiet"]
    assert main([*args, "--input-shape", "64", "--out", str(out)]) == 0
    merged = accord.load_user_model(out / "model.safetensors", "tests_pkg.module:Flat")
    with torch.no_grad():
        torch.testing.assert_close(merged.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "report.json").read_text())["config"]["input_shape"] == [64]
    # without it the class is traced on the data's first batch: 1x8x8 images it cannot read
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{files[0]} does not run on the data's images, of shape (2, 1, 8, 8)" in err
    assert main([*args, "--input-shape", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape 3,8,8: tests_pkg.module:Flat" in err and str(files[0]) in err
    assert main([*args, "--input-shape", "3,x"]) == 2
    assert "input_shape: " in capsys.readouterr().err
    with pytest.raises(
        accord.DataError, match="--input-shape 4,16: the images of digits are 1×8×8"
    ):
        fit_input(torch.zeros(2, 1, 8, 8), (4, 16), "digits")
    fitted = fit_input(torch.rand(2, 1, 8, 8), (3, 16, 16), "digits")
    assert fitted.shape == (2, 3, 16, 16) and torch.equal(fitted[:, 0], fitted[:, 2])


def test_input_shape_is_for_a_class_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, _, _ = _twins("vit", tmp_path)
    args = ["merge", str(first), str(second), "--input-shape", "3,16,16", "--quiet"]
    assert main(args) == 2
    assert "input_shape (--input-shape) is for --model" in capsys.readouterr().err
