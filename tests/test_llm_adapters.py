"""peft LoRA adapters as task vectors, checked against peft itself: its merge_and_unload is
accord's task arithmetic at weight 1, the deltas follow peft's scaling (lora_alpha / r, rsLoRA,
rank and alpha patterns, embeddings, fan_in_fan_out), and a merged adapter loads in peft with the
logits of the full merged checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from accord.cli import main as accord_main  # noqa: E402
from accord.combine.ties import ties as ties_formula  # noqa: E402
from accord.errors import ConfigError, ModelError  # noqa: E402
from accord.llm import load_state_and_config  # noqa: E402
from accord.llm.adapters import merge_adapters  # noqa: E402
from accord.llm.merge import merge_checkpoints  # noqa: E402
from accord.llm.testing import tiny_any_model, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# Two adapters of one base that between them use every option accord reads: modules_to_save,
# an embedding, rsLoRA, rank and alpha patterns.
ADAPTERS = {
    "ad1": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "modules_to_save": ["lm_head"],
    },
    "ad2": {
        "r": 2,
        "lora_alpha": 3,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "gate_proj", "embed_tokens"],
        "rank_pattern": {"k_proj": 3},
        "alpha_pattern": {"gate_proj": 5},
    },
}


def _adapter(base: torch.nn.Module, seed: int, **options: object) -> peft.PeftModel:
    """A peft LoRA model of a copy of ``base`` with random (not zero) B factors."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # trained-looking factors and saved modules, not the initial ones
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_model("llama", seed=0)
    base.save_pretrained(root / "base")
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        _adapter(base, seed, **options).save_pretrained(root / name)
    return {"base": root / "base", **{name: root / name for name in ADAPTERS}}


def _base() -> torch.nn.Module:
    return tiny_model("llama", seed=0)


def _peft_merged(path: Path, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's own merge of one adapter into ``base``."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_state_and_config(path)[0]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(24).reshape(2, 12) * 5 % 100).logits


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_task_arithmetic_of_one_adapter_is_peft_merge_and_unload(
    saved: dict[str, Path], adapter: str, tmp_path: Path
) -> None:
    out = merge_checkpoints(
        [saved[adapter]], tmp_path / "out", method="task_arithmetic", base=saved["base"]
    )
    ours, theirs = _load(out), _peft_merged(saved[adapter], _base())
    assert set(ours) == set(theirs)
    changed = 0
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-6)
        changed += not torch.equal(theirs[name], _base().state_dict()[name])
    assert changed >= 6  # the adapter's targets really moved


def test_weighted_task_arithmetic_and_ties_follow_the_formulas(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    base = _base().state_dict()
    deltas = [
        {k: v - base[k] for k, v in _peft_merged(saved[a], _base()).items()} for a in ADAPTERS
    ]
    models = [saved[a] for a in ADAPTERS]
    common = {"base": saved["base"], "weights": [0.5, 2.0]}
    arithmetic = _load(
        merge_checkpoints(
            models,
            tmp_path / "ta",
            method="task_arithmetic",
            parameters={"scale": 0.7},
            **common,
        )
    )
    ties = _load(
        merge_checkpoints(
            models, tmp_path / "ties", method="ties", parameters={"density": 0.5}, **common
        )
    )
    for name, tensor in base.items():
        expected = tensor + 0.7 * (0.5 * deltas[0][name] + 2.0 * deltas[1][name])
        torch.testing.assert_close(arithmetic[name], expected, rtol=1e-5, atol=1e-6)
        pair = [deltas[0][name], deltas[1][name]]
        expected = tensor + ties_formula(pair, [0.5, 2.0], density=0.5, normalize=True)
        torch.testing.assert_close(ties[name], expected, rtol=1e-5, atol=1e-6)


def test_merged_adapter_loads_in_peft_with_the_full_checkpoints_logits(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    models, weights = [saved[a] for a in ADAPTERS], [0.6, -0.4]
    adapter = merge_adapters(models, tmp_path / "adapter", base=saved["base"], weights=weights)
    full = merge_checkpoints(
        models, tmp_path / "full", method="task_arithmetic", base=saved["base"], weights=weights
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 + 3  # each adapter's largest rank, stacked
    loaded = peft.PeftModel.from_pretrained(_base(), adapter).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(full).eval()
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-5, atol=1e-5)
    unloaded = loaded.merge_and_unload().state_dict()
    for name, tensor in _load(full).items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_adapter_matches_peft(tmp_path: Path) -> None:
    base = tiny_any_model("GPT2LMHeadModel", seed=0)
    base.save_pretrained(tmp_path / "base")
    options = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"]}
    _adapter(base, 3, fan_in_fan_out=True, **options).save_pretrained(tmp_path / "ad")
    out = merge_checkpoints(
        [tmp_path / "ad"], tmp_path / "out", method="task_arithmetic", base=tmp_path / "base"
    )
    ours, theirs = _load(out), _peft_merged(tmp_path / "ad", base)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-6)
    adapter = merge_adapters([tmp_path / "ad"], tmp_path / "merged", base=tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-5, atol=1e-5)


def test_cli_config_takes_adapters_as_models(saved: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"method: dare_ties\nbase: {saved['base']}\nmodels: [{saved['ad1']}, {saved['ad2']}]\n"
        "parameters: {drop_rate: 0.3}\n",
        encoding="utf-8",
    )
    assert accord_main(["llm-merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.isfinite(_logits(merged)).all()


def test_adapter_without_a_base_is_refused_by_name(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{saved['ad1']} is a LoRA adapter"):
        merge_checkpoints([saved["ad1"], saved["base"]], tmp_path / "out", method="linear")


def test_adapter_of_another_base_names_the_tensor(saved: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    tiny_model("llama", seed=0, intermediate_size=40).save_pretrained(other)
    with pytest.raises(ModelError, match=r"down_proj\.weight.*adapter's base model"):
        merge_checkpoints([saved["ad1"]], tmp_path / "out", method="task_arithmetic", base=other)


def test_dora_adapters_are_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    _adapter(_base(), 5, r=2, target_modules=["q_proj"], use_dora=True).save_pretrained(
        tmp_path / "dora"
    )
    with pytest.raises(ModelError, match="use_dora"):
        merge_checkpoints(
            [tmp_path / "dora"], tmp_path / "out", method="task_arithmetic", base=saved["base"]
        )
