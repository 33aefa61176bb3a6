"""Reading, writing and merging Llama-family checkpoints on disk, and ``accord llm-merge``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from accord.cli import main as accord_main  # noqa: E402
from accord.combine.ties import ties  # noqa: E402
from accord.errors import ConfigError, ModelError  # noqa: E402
from accord.llm import (  # noqa: E402
    load_state_and_config,
    open_checkpoint,
    random_symmetry,
    save_checkpoint,
)
from accord.llm import merge as llm_merge_module  # noqa: E402
from accord.llm.cli import llm_merge_main  # noqa: E402
from accord.llm.config import validate_llm_merge_config  # noqa: E402
from accord.llm.merge import merge_checkpoints  # noqa: E402
from accord.llm.testing import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _save(model: torch.nn.Module, path: Path, **options: int) -> Path:
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}
    return save_checkpoint(path, dict(model.state_dict()), config, **options)


def _finetuned(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``base`` plus a small random task vector."""
    model = type(base)(base.config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=generator)
        for k, v in base.state_dict().items()
    }
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, two fine-tuned models and a receiver that is a random-symmetry copy of the base,
    saved as checkpoints (the second fine-tuned model in several shards)."""
    root = tmp_path_factory.mktemp("family")
    base = tiny_model("qwen2", seed=0)
    return {
        "base": _save(base, root / "base"),
        "ft1": _save(_finetuned(base, 1), root / "ft1"),
        "ft2": _save(_finetuned(base, 2), root / "ft2", shard_size=20_000),
        "receiver": _save(random_symmetry(base, seed=3), root / "receiver"),
    }


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_state_and_config(path)[0]


def test_sharded_round_trip_with_and_without_index(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=1, tie_word_embeddings=True)
    path = _save(model, tmp_path / "m", shard_size=10_000)
    files = sorted(p.name for p in path.iterdir())
    assert "model.safetensors.index.json" in files and len(files) > 4
    state, _ = load_state_and_config(path)
    assert "lm_head.weight" not in state  # tied: left out, as save_pretrained does
    for key, tensor in state.items():
        assert torch.equal(tensor, model.state_dict()[key])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    (path / "model.safetensors.index.json").unlink()  # shards alone are found by their headers
    assert set(open_checkpoint(path).state) == set(state)


def test_reads_what_save_pretrained_writes(tmp_path: Path) -> None:
    model = tiny_model("mistral", seed=2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    checkpoint = open_checkpoint(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(checkpoint.state[name], model.state_dict()[name])


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    path = _save(tiny_model("llama", seed=3), tmp_path / "m", shard_size=10_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError, match=shard.name):
        open_checkpoint(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    path = _save(tiny_model("llama", seed=4), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps(config | {"architectures": ["MixtralForCausalLM"]})
    )
    with pytest.raises(
        ModelError, match=r"MixtralForCausalLM.*LlamaForCausalLM, .*GPT2LMHeadModel"
    ):
        random_symmetry(path)


def test_tensor_that_disagrees_with_its_config_is_named(tmp_path: Path) -> None:
    path = _save(tiny_model("llama", seed=4), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    with pytest.raises(ModelError, match=r"mlp\.\w+_proj\.weight.*\(48, 32\)|\(32, 48\)"):
        random_symmetry(path)


def test_ties_merge_loads_with_transformers(family: dict[str, Path], tmp_path: Path) -> None:
    out = merge_checkpoints(
        [family["ft1"], family["ft2"]],
        tmp_path / "ties",
        method="ties",
        base=family["base"],
        parameters={"density": 0.5, "scale": 0.8},
        shard_size=30_000,
    )
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    base, ft1, ft2 = (_load(family[k]) for k in ("base", "ft1", "ft2"))
    for name, tensor in loaded.state_dict().items():
        deltas = [ft1[name] - base[name], ft2[name] - base[name]]
        expected = base[name] + ties(deltas, density=0.5, scale=0.8)
        torch.testing.assert_close(tensor, expected)


def test_dare_ties_merge_is_reproducible_and_loads(family: dict[str, Path], tmp_path: Path) -> None:
    outs = [
        merge_checkpoints(
            [family["ft1"], family["ft2"]],
            tmp_path / f"dare{i}",
            method="dare_ties",
            base=family["base"],
            parameters={"drop_rate": 0.5},
            seed=7,
            dtype=torch.bfloat16,
        )
        for i in range(2)
    ]
    first, second = _load(outs[0]), _load(outs[1])
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["model.norm.weight"].dtype == torch.bfloat16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(outs[0])
    assert loaded.dtype == torch.bfloat16


def test_merging_one_model_linearly_returns_it(family: dict[str, Path], tmp_path: Path) -> None:
    out = merge_checkpoints([family["ft1"]], tmp_path / "one", method="linear")
    original = _load(family["ft1"])
    assert all(torch.equal(t, original[k]) for k, t in _load(out).items())


def test_aligned_task_arithmetic_transfers_to_a_permuted_receiver(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """The receiver is the base in other coordinates: aligned, it takes the task vector as the
    base would; unaligned, the task vector lands on the wrong features."""
    common = {"method": "task_arithmetic", "base": family["base"], "receiver": family["receiver"]}
    aligned = _load(merge_checkpoints([family["ft1"]], tmp_path / "a", align=True, **common))
    plain = _load(merge_checkpoints([family["ft1"]], tmp_path / "p", **common))
    target = _load(family["ft1"])
    assert max(float((aligned[k] - t).abs().max()) for k, t in target.items()) < 1e-5
    assert max(float((plain[k] - t).abs().max()) for k, t in target.items()) > 0.1


def test_failure_mid_write_leaves_no_output(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = llm_merge_module._checked  # every merged tensor (or row block) passes here

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(llm_merge_module, "_checked", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_checkpoints(
            [family["ft1"]],
            tmp_path / "out",
            method="task_arithmetic",
            base=family["base"],
            shard_size=10_000,
        )
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []


def test_non_finite_inputs_and_outputs_name_the_file_and_tensor(
    family: dict[str, Path], tmp_path: Path
) -> None:
    state, config = load_state_and_config(family["ft1"])
    state["model.norm.weight"][3] = float("nan")
    broken = save_checkpoint(tmp_path / "broken", state, config)
    with pytest.raises(ModelError, match=r"broken: tensor 'model\.norm\.weight' has 1 NaN among"):
        merge_checkpoints([family["ft2"], broken], tmp_path / "out")
    # finite task vectors scaled past float16's range
    with pytest.raises(ModelError, match=r"merged tensor '.*' has \d+ inf among .* torch\.float16"):
        merge_checkpoints(
            [family["ft1"]],
            tmp_path / "out",
            method="task_arithmetic",
            base=family["base"],
            parameters={"scale": 1e8},
            dtype=torch.float16,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_mismatched_configs_name_the_key(family: dict[str, Path], tmp_path: Path) -> None:
    other = _save(tiny_model("qwen2", seed=5, vocab_size=120), tmp_path / "wide")
    with pytest.raises(ConfigError, match="vocab_size"):
        merge_checkpoints([family["ft1"], other], tmp_path / "out")


def test_method_problems_are_reported_together(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        merge_checkpoints(
            [family["ft1"]], tmp_path / "out", method="slerp", parameters={"density": 2.0}
        )
    message = str(error.value)
    assert "parameters.density" in message and "exactly 2" in message


def _write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_merges_from_yaml(family: dict[str, Path], tmp_path: Path) -> None:
    config = _write_yaml(
        tmp_path / "ties.yaml",
        f"""
method: ties
base: {family["base"]}
models:
  - {family["ft1"]}
  - {{path: {family["ft2"]}, weight: 0.5}}
parameters: {{density: 0.3}}
shard_size: 40KB
output: {tmp_path / "merged"}
""",
    )
    assert llm_merge_main(config, progress=False) == 0
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_cli_reports_every_bad_key(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_yaml(
        tmp_path / "bad.yaml",
        f"""
method: tie
models: [{family["ft1"]}, {tmp_path / "nowhere"}]
paramters: {{density: 0.3}}
output: {tmp_path / "merged"}
""",
    )
    assert llm_merge_main(config, progress=False) == 2
    err = capsys.readouterr().err
    assert "paramters" in err and "did you mean 'parameters'" in err
    config = _write_yaml(
        tmp_path / "bad2.yaml",
        f"""
method: tie
models: [{family["ft1"]}, {tmp_path / "nowhere"}]
output: {tmp_path / "merged"}
""",
    )
    assert llm_merge_main(config, progress=False) == 2
    err = capsys.readouterr().err
    assert "did you mean 'ties'" in err and "models[1].path" in err
    assert not (tmp_path / "merged").exists()


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_llm_config() -> str:
    """The YAML example of README.md's section "Transformers and LLMs"."""
    section = README.read_text(encoding="utf-8").split("## Transformers and LLMs", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None, "README's Transformers section lost its YAML example"
    return block.group(1)


def test_readme_example_config_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's config (no shard_size: the default is used) merges tiny models placed at
    its paths; the aligned receiver is the base in other coordinates, so the result is the
    TIES merge onto the base itself."""
    base = tiny_model("llama", seed=0)
    models = tmp_path / "models"
    _save(base, models / "llama-base")
    _save(_finetuned(base, 1), models / "llama-math")
    _save(_finetuned(base, 2), models / "llama-code")
    _save(random_symmetry(base, seed=3), models / "llama-other")
    (tmp_path / "ties.yaml").write_text(_readme_llm_config(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert accord_main(["llm-merge", "ties.yaml", "--quiet"]) == 0
    merged = _load(tmp_path / "merged" / "ties")
    expected = _load(
        merge_checkpoints(
            [models / "llama-math", models / "llama-code"],
            tmp_path / "expected",
            method="ties",
            base=models / "llama-base",
            weights=[1.0, 0.5],
            parameters={"density": 0.2, "scale": 1.0},
        )
    )
    assert merged.keys() == expected.keys()
    assert max(float((merged[k] - t).abs().max()) for k, t in expected.items()) < 1e-5
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "ties")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, 2_000_000_000),  # the default, "2GB"
        ("2GB", 2_000_000_000),
        ("500MB", 500_000_000),
        ("1.5GiB", 1_610_612_736),
        ("40KB", 40_000),
        (123456, 123456),
    ],
)
def test_shard_size_is_parsed_from_the_default_and_the_config(
    family: dict[str, Path], tmp_path: Path, text: str | int | None, expected: int
) -> None:
    data = {"method": "linear", "models": [str(family["ft1"])], "output": str(tmp_path / "o")}
    if text is not None:
        data["shard_size"] = text
    assert validate_llm_merge_config(data).shard_size == expected


@pytest.mark.parametrize("text", ["2XB", "lots", "0", "-5", "1e9"])
def test_bad_shard_size_names_the_key(family: dict[str, Path], tmp_path: Path, text: str) -> None:
    data = {"method": "linear", "models": [str(family["ft1"])], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"shard_size: .*500MB"):
        validate_llm_merge_config(data | {"shard_size": text})
    with pytest.raises(ConfigError, match=r"shard_size: .*500MB"):
        merge_checkpoints([family["ft1"]], tmp_path / "o", shard_size=text)


def test_dare_seed_changes_the_drops_and_not_the_shard_layout(
    family: dict[str, Path], tmp_path: Path
) -> None:
    def dare(seed: int, shard_size: int = 10**9) -> dict[str, torch.Tensor]:
        out = tmp_path / f"dare{len(list(tmp_path.iterdir()))}"
        return _load(
            merge_checkpoints(
                [family["ft1"], family["ft2"]],
                out,
                method="dare",
                base=family["base"],
                parameters={"drop_rate": 0.5},
                seed=seed,
                shard_size=shard_size,
            )
        )

    runs = {seed: dare(seed) for seed in (0, 1, 2)}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for name in runs[a]:
            assert not torch.equal(runs[a][name], runs[b][name]), (a, b, name)
    for repeat in (dare(1), dare(1, shard_size=10_000)):
        assert all(torch.equal(t, runs[1][name]) for name, t in repeat.items())


def test_seed_beyond_the_generator_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    common = {"method": "dare", "base": family["base"], "seed": 2**32}
    with pytest.raises(ConfigError, match="seed"):
        merge_checkpoints([family["ft1"]], tmp_path / "o", **common)
    data = {"models": [str(family["ft1"])], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match="seed"):
        validate_llm_merge_config(data | common | {"base": str(family["base"])})


def test_outputs_are_byte_identical_across_processes(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """Two processes with different string hashing write the same bytes (the inputs have no
    index, so tensor order comes from the shard headers)."""
    assert not (family["base"] / "model.safetensors.index.json").exists()
    config = _write_yaml(
        tmp_path / "ta.yaml",
        f"""
method: task_arithmetic
base: {family["base"]}
models: [{family["ft1"]}]
shard_size: 30KB
output: merged
""",
    )
    outputs = []
    for hash_seed in ("1", "2"):
        run = tmp_path / f"run{hash_seed}"
        run.mkdir()
        env = os.environ | {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        command = [sys.executable, "-m", "accord.cli", "llm-merge", str(config), "--quiet"]
        result = subprocess.run(
            command, cwd=run, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted((run / "merged").iterdir())})
    assert "model.safetensors.index.json" in outputs[0]
    assert outputs[0] == outputs[1]


def test_output_folder_follows_the_umask(family: dict[str, Path], tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        out = merge_checkpoints([family["ft1"]], tmp_path / "out", shard_size=30_000)
        again = merge_checkpoints([family["ft1"]], out, overwrite=True)
    finally:
        os.umask(previous)
    assert again == out
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}
