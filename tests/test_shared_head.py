"""The zoo's frozen shared class head, accuracy per task, and the quality bench's task settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import accord
from accord.bench import quality_plan
from accord.bench._common import summary
from accord.bench.markdown import _task_table
from accord.bench.quality import TASK_SETTINGS, add_task_rows, only_settings
from accord.zoo.head import LOGIT_SCALE, SharedClassHead

DIM = 6
ARCHITECTURES = {
    "mlp": {"width": 12, "depth": 2},
    "vgg11-bn": {"width": 0.0625, "batch_norm": True},
    "resnet20": {"width": 0.25},
    "vit": {"dim": 8, "depth": 1, "heads": 2},
}
ALIGNS = tuple(name for name, info in sorted(accord.ALIGNMENTS.items()) if info.aligns)


def _model(name: str, seed: int = 0, class_embeddings: int | None = DIM) -> nn.Module:
    torch.manual_seed(seed)
    config = {**ARCHITECTURES[name], "in_channels": 1, "image_size": 8}
    if class_embeddings is not None:
        config["class_embeddings"] = class_embeddings
    return accord.build_model(name.removesuffix("-bn"), **config)


def _head(model: nn.Module) -> SharedClassHead:
    [head] = [m for m in model.modules() if isinstance(m, SharedClassHead)]
    return head


def _inputs(samples: int = 64) -> torch.Tensor:
    return torch.randn(samples, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_seed_gets_the_same_frozen_embeddings_and_the_head_space_stays_fixed(
    arch: str,
) -> None:
    first, second = _model(arch, seed=0), _model(arch, seed=1)
    head = _head(first)
    assert torch.equal(head.embeddings, _head(second).embeddings)
    assert float(head.scale) == LOGIT_SCALE == float(_head(second).scale)
    assert not torch.equal(head.proj.weight, _head(second).proj.weight)
    torch.testing.assert_close(head.embeddings.norm(dim=1), torch.ones(10))
    trainable = {name for name, _ in first.named_parameters()}
    assert not any(name.endswith(("embeddings", "scale")) for name in trainable)

    spec = accord.trace(first, _inputs(2))
    plain = accord.trace(_model(arch, class_embeddings=None), _inputs(2))
    [space] = [s for s in spec.spaces if s.size == DIM and s.name.endswith("proj")]
    assert space not in spec.free_spaces  # the d-dim output: E's columns never move
    # the features before the head's Linear are as free as before a trainable head
    free = [(s.name, s.size, s.maps) for s in spec.free_spaces]
    assert free == [(s.name, s.size, s.maps) for s in plain.free_spaces]
    assert any(r.tensor.endswith("proj.weight") for s in spec.free_spaces for r in s.readers)


def test_a_model_without_the_option_keeps_its_config_and_a_checkpoint_keeps_the_head(
    tmp_path,
) -> None:
    assert "class_embeddings" not in accord.model_config(_model("mlp", class_embeddings=None))
    model = _model("mlp")
    assert accord.model_config(model)["class_embeddings"] == DIM
    accord.save_checkpoint(model, tmp_path / "ckpt", {})
    loaded = accord.load_checkpoint(tmp_path / "ckpt").model
    assert torch.equal(_head(loaded).embeddings, _head(model).embeddings)
    inputs = _inputs()
    torch.testing.assert_close(loaded(inputs), model.eval()(inputs), rtol=0, atol=0)


def test_a_user_s_embeddings_from_a_file_replace_the_seeded_ones(tmp_path) -> None:
    values = torch.randn(10, DIM, generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "clip.npy", values.numpy())
    torch.save(3 * values, tmp_path / "clip.pt")
    first = accord.set_class_embeddings(_model("mlp", seed=0), tmp_path / "clip.npy")
    second = accord.set_class_embeddings(_model("mlp", seed=1), str(tmp_path / "clip.pt"))
    expected = values / values.norm(dim=1, keepdim=True)
    torch.testing.assert_close(_head(first).embeddings, expected)
    torch.testing.assert_close(_head(second).embeddings, expected)
    accord.save_checkpoint(first, tmp_path / "ckpt", {})
    loaded = accord.load_checkpoint(tmp_path / "ckpt").model
    assert torch.equal(_head(loaded).embeddings, _head(first).embeddings)
    with pytest.raises(accord.ModelError, match=r"shape \(10, 5\); this head needs \(10, 6\)"):
        accord.set_class_embeddings(_model("mlp"), values[:, :5])
    with pytest.raises(accord.ModelError, match=r"class_embeddings=d"):
        accord.set_class_embeddings(_model("mlp", class_embeddings=None), values)
    with pytest.raises(accord.ModelError, match=r"clip.txt: .* \.npy or \.pt file"):
        accord.set_class_embeddings(_model("mlp"), tmp_path / "clip.txt")


def test_a_bad_embedding_dimension_names_the_key() -> None:
    with pytest.raises(accord.ModelError, match=r"class_embeddings=0 must be positive"):
        accord.build_model("mlp", class_embeddings=0)
    with pytest.raises(accord.ModelError, match=r"class_embeddings='64' must be an integer"):
        accord.build_model("mlp", class_embeddings="64")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_permuted_twin_is_exact_and_keeps_the_head(arch: str, assert_preserved) -> None:
    model = _model(arch).eval()
    inputs = _inputs()
    spec = accord.trace(model, inputs[:2])
    assert_preserved(model, inputs, spec)
    twin = accord.randomly_permuted(model, spec, seed=3)
    [head] = [name for name, m in model.named_modules() if isinstance(m, SharedClassHead)]
    for name in ("embeddings", "scale", "proj.bias"):
        key = f"{head}.{name}"
        assert torch.equal(twin.state_dict()[key], model.state_dict()[key])


@pytest.mark.parametrize("arch", ["mlp", "vgg11-bn"])
@pytest.mark.parametrize("method", ALIGNS)
def test_merging_a_model_with_its_permuted_twin_returns_it(arch: str, method: str) -> None:
    model = _model(arch)
    inputs = _inputs(256)
    data = [(inputs, torch.zeros(len(inputs), dtype=torch.long))]
    model = accord.reset_batchnorm(model, data)  # so that a repair leaves it as it is
    spec = accord.trace(model, inputs[:2])
    twin = accord.randomly_permuted(model, spec, seed=3)
    result = accord.merge([model, twin], data, method=method, spec=spec)
    assert torch.equal(_head(result.model).embeddings, _head(model).embeddings)
    assert torch.equal(_head(result.model).scale, _head(model).scale)
    with torch.no_grad():
        expected, merged = model.eval()(inputs), result.model.eval()(inputs)
    assert float((merged - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("combine", sorted(accord.COMBINERS))
def test_every_combiner_keeps_the_shared_embeddings(combine: str) -> None:
    base = _model("mlp")
    tuned = []
    for _ in range(2):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        tuned.append(model)
    inputs = _inputs(32)
    data = [(inputs, torch.arange(len(inputs)) % 10)]
    record = accord.COMBINERS[combine]
    result = accord.merge(
        tuned,
        data,
        align="identity",
        combine=combine,
        base=None if record.needs.base == "no" else base,
        repair="none",
    )
    assert torch.equal(_head(result.model).embeddings, _head(base).embeddings)
    assert torch.equal(_head(result.model).scale, _head(base).scale)


class _Logits(nn.Module):
    """Its inputs are the logits (scaled, so an ensemble with it averages differently)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def test_task_and_joint_accuracy_of_hand_made_logits() -> None:
    logits = torch.tensor(
        [
            [5.0, 1.0, 9.0, 0.0],  # label 0: joint says 2, task 0 says 0 (right)
            [1.0, 5.0, 0.0, 0.0],  # label 0: both say 1
            [0.0, 0.0, 1.0, 2.0],  # label 3: both say 3 (right)
            [9.0, 0.0, 1.0, 2.0],  # label 2: joint says 0, task 1 says 3
            [0.0, 9.0, 3.0, 1.0],  # label 2: joint says 1, task 1 says 2 (right)
        ]
    )
    labels = torch.tensor([0, 0, 3, 2, 2])
    data = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    evaluation = accord.evaluate_tasks(_Logits(), data, [[0, 1], [2, 3]])
    assert evaluation.tasks == (1 / 2, 2 / 3)
    assert evaluation.joint == 1 / 5 == accord.evaluate(_Logits(), data).accuracy
    assert evaluation.counts == (2, 3) and evaluation.count == 5
    # the ensemble averages logits: -x and 3x give x's predictions
    ensemble = accord.evaluate_tasks([_Logits(-1.0), _Logits(3.0)], data, [[0, 1], [2, 3]])
    assert ensemble == evaluation
    # a task over classes 1 and 3 only: label-0 and label-2 examples are not its
    assert accord.evaluate_tasks(_Logits(), data, [[3, 1]]).tasks == (1.0,)
    with pytest.raises(ValueError, match=r"task 1 classes \[4\] are outside the model's 4"):
        accord.evaluate_tasks(_Logits(), data, [[0], [4]])
    with pytest.raises(ValueError, match=r"no example of task 0 \[1\]"):
        accord.evaluate_tasks(_Logits(), data, [[1]])


def test_task_classes_of_the_paper_splits() -> None:
    labels = np.repeat(np.arange(6), 10)
    parts = accord.split_indices(labels, 3, "classes", seed=4)
    tasks = accord.task_classes(labels, parts)
    assert [t.tolist() for t in tasks] == [np.unique(labels[p]).tolist() for p in parts]
    parts = accord.split_indices(labels, 2, "80-20", seed=4)
    tasks = accord.task_classes(torch.as_tensor(labels), parts)
    assert [t.tolist() for t in tasks] == [[0, 1, 2], [3, 4, 5]]
    assert all((labels[parts[0]] == c).sum() == 8 for c in (0, 1, 2))


def test_the_full_plan_has_the_task_settings_with_the_shared_head() -> None:
    full = quality_plan(dataset="digits")
    settings = {s.label: s for s in full.settings}
    assert settings["classes"].sizes == (2, 4) and settings["80-20"].sizes == (2,)
    assert settings["classes"].class_embeddings == settings["80-20"].class_embeddings > 0
    assert full.to_json()["settings"][-1]["class_embeddings"] == TASK_SETTINGS[-1].class_embeddings
    quick = quality_plan(quick=True, dataset="digits")
    assert [s.label for s in quick.settings] == ["iid", "dirichlet0.5"]
    tasks = only_settings(quick, ["classes", "80-20"])
    assert tasks.settings == TASK_SETTINGS
    assert tasks.command.endswith("--settings classes,80-20")


def test_task_rows_summarise_each_set_and_render() -> None:
    configuration = {
        "arch": "mlp",
        "setting": "classes",
        "num_models": 2,
        "rows": [
            {"name": "base", "test": summary([0.5, 0.6])},
            {"name": "cca", "test": summary([0.4, 0.3])},
            {"name": "cca_transform", "test": summary([0.2, 0.2])},
        ],
    }
    classes = [[0, 2], [1, 3]]
    per_set = [
        (classes, {"base": (0.9, 0.8), "cca": (0.7, 0.5)}),
        (classes, {"base": (1.0, 0.6), "cca": (0.5, 0.5)}),
    ]
    add_task_rows(configuration, per_set)
    rows = {row["name"]: row for row in configuration["rows"]}
    assert configuration["tasks"] == [classes, classes]
    assert [t["values"] for t in rows["cca"]["tasks"]] == [[0.7, 0.5], [0.5, 0.5]]
    assert rows["base"]["tasks"][0]["mean"] == pytest.approx(0.95)
    assert "tasks" not in rows["cca_transform"]
    table = "\n".join(_task_table(configuration))
    assert "### mlp, classes, N = 2: per task" in table
    assert "task 0 (classes 0, 2)" in table and "task 1 (classes 1, 3)" in table
    # CCA: task means per set 0.6 and 0.5 -> 55.0 ± 7.1; joint 35.0 ± 7.1
    [cca] = [line for line in table.splitlines() if line.startswith("| CCA Merge ")]
    cells = [cell.strip() for cell in cca.strip("|").split("|")]
    assert cells[1:] == ["60.0 ± 14.1", "50.0 ± 0.0", "55.0 ± 7.1", "35.0 ± 7.1"]
