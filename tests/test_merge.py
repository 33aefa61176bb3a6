"""The merge engine end to end: permuted copies are recovered, repairs, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import accord
from _counted import CountedBatches
from accord.combine.average import average_states
from accord.merge import check_compatible

METHODS = tuple(name for name, info in sorted(accord.ALIGNMENTS.items()) if info.aligns)

ARCHITECTURES = {
    "mlp": {"width": 24, "depth": 2, "in_channels": 1, "image_size": 8},
    "vgg11": {"width": 0.0625, "in_channels": 1, "image_size": 8},
    "vgg11-bn": {"width": 0.0625, "batch_norm": True, "in_channels": 1, "image_size": 8},
    "resnet20": {"width": 0.5, "in_channels": 1, "image_size": 8},
    "vit": {"dim": 16, "depth": 1, "heads": 2, "patch_size": 4, "in_channels": 1, "image_size": 8},
}


def _model(name: str) -> nn.Module:
    """A zoo model with non-trivial BatchNorms whose statistics are those of :func:`_data`.

    Then a BatchNorm reset on that data leaves the function unchanged, so a merge that
    recovers a permuted copy must reproduce the model exactly, whatever its repair.
    """
    torch.manual_seed(0)
    config = dict(ARCHITECTURES[name])
    model = accord.build_model(name.removesuffix("-bn"), **config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return accord.reset_batchnorm(model, _data(model))


def _data(model: nn.Module, samples: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = accord.model_config(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(
        samples,
        config["in_channels"],
        config["image_size"],
        config["image_size"],
        generator=generator,
    )
    # One batch, so a BatchNorm reset sees exactly the statistics the matchers saw.
    return [(inputs, torch.zeros(samples, dtype=torch.long))]


def _relative_difference(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        out_a, out_b = a.eval()(inputs), b.eval()(inputs)
    return float((out_a - out_b).abs().max() / out_a.abs().max())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method", METHODS)
def test_merging_a_permuted_copy_returns_the_model(arch: str, method: str) -> None:
    model = _model(arch)
    data = _data(model)
    spec = accord.trace(model, data[0][0][:2])
    twin = accord.randomly_permuted(model, spec, seed=3)
    assert _relative_difference(model, twin, data[0][0]) < 1e-5
    result = accord.merge([model, twin], data, method=method, spec=spec)
    assert _relative_difference(model, result.model, data[0][0]) <= 1e-4


def test_permuted_copies_come_back_where_correlations_tie() -> None:
    # The five channels after the 1×1 conv are a·u + b of one channel u: behind the ReLU
    # they correlate ±1 with each other (or are constant), so only the tie-break of the
    # permutation matching (means and scales) tells them apart.
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(2, 1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(1, 5, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 6 * 6, 3),
        ).eval()
        inputs = torch.randn(256, 2, 6, 6, generator=torch.Generator().manual_seed(seed))
        data = [(inputs, torch.zeros(256, dtype=torch.long))]
        twin = accord.randomly_permuted(model, accord.trace(model, inputs[:2]), seed=seed + 1)
        merged = accord.merge([model, twin], data, method="permutation").model
        assert _relative_difference(model, merged, inputs) < 1e-5, seed


def test_merge_keeps_inputs_and_is_deterministic() -> None:
    model = _model("vgg11-bn")
    data = _data(model)
    twin = accord.randomly_permuted(model, accord.trace(model, data[0][0][:2]), seed=1)
    before = [copy.deepcopy(m.state_dict()) for m in (model, twin)]
    first = accord.merge([model, twin], data, method="cca")
    second = accord.merge([model, twin], data, method="cca")
    for m, state in zip((model, twin), before, strict=True):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert all(
        torch.equal(first.model.state_dict()[k], v) for k, v in second.model.state_dict().items()
    )
    assert first.model is not model and type(first.model) is type(model)


def test_a_merge_reads_the_data_once_per_pass() -> None:
    """One statistics pass (these features are not nearly dependent: no second pass), and
    under repair="bn-reset" one reset pass. The checks before it and the trace read only the
    first batch, so every later batch is drawn once per pass."""
    model = _model("vgg11-bn")
    inputs = _data(model)[0][0]
    twin = accord.randomly_permuted(model, accord.trace(model, inputs[:2]), seed=1)
    data = CountedBatches((x, torch.zeros(len(x), dtype=torch.long)) for x in inputs.split(128))
    plain = accord.merge([model, twin], data, "cca", repair="none")
    assert data.drawn[1:] == [1, 1, 1]
    data.drawn = [0] * len(data)
    accord.merge([model, twin], data, "cca", repair="bn-reset")
    assert data.drawn[1:] == [2, 2, 2]
    # every stage's wall seconds, and its CPU seconds (what shared cores hardly move)
    assert list(plain.report["cpu_timings"]) == list(plain.report["timings"])
    stages = {"trace", "statistics", "match", "apply", "combine", "repair"}
    assert set(plain.report["timings"]) == stages
    assert all(seconds >= 0 for seconds in plain.report["cpu_timings"].values())


def test_statistics_are_reused_across_methods_and_options() -> None:
    model = _model("mlp")
    data = _data(model)
    spec = accord.trace(model, data[0][0][:2])
    twin = accord.randomly_permuted(model, spec, seed=2)
    stats = accord.collect_statistics([model, twin], data, spec, progress=False)
    for ridge in (0.01, 1.0):
        result = accord.merge(
            [model, twin],
            None,
            method="cca",
            spec=spec,
            statistics=stats,
            repair="none",
            ridge=ridge,
        )
        assert _relative_difference(model, result.model, data[0][0]) <= 1e-4
        assert result.report["options"]["ridge"] == ridge


def test_merging_three_models_star_around_reference() -> None:
    model = _model("mlp")
    data = _data(model)
    spec = accord.trace(model, data[0][0][:2])
    models = [accord.randomly_permuted(model, spec, seed=s) for s in (1, 2)] + [model]
    result = accord.merge(models, data, method="permutation", spec=spec, reference=2, repair="none")
    assert result.report["reference"] == 2
    assert _relative_difference(model, result.model, data[0][0]) <= 1e-4
    identity = torch.eye(24, dtype=torch.float64)
    assert all(
        torch.equal(t.matrix, identity[: t.size, : t.size]) for t in result.transforms[2].values()
    )


def test_identity_merge_averages_weights() -> None:
    torch.manual_seed(0)
    models = [
        accord.build_model("mlp", width=8, depth=1, in_channels=1, image_size=4) for _ in range(2)
    ]
    example = torch.randn(2, 1, 4, 4)
    result = accord.merge(models, [(example, torch.zeros(2))], method="identity", repair="none")
    for key, value in result.model.state_dict().items():
        expected = (models[0].state_dict()[key] + models[1].state_dict()[key]) / 2
        assert torch.allclose(value, expected)


def test_repair_restores_channel_statistics() -> None:
    torch.manual_seed(0)
    models = [
        accord.build_model("mlp", width=32, depth=2, in_channels=1, image_size=8) for _ in range(2)
    ]
    inputs = torch.randn(256, 1, 8, 8)
    data = [(inputs, torch.zeros(256, dtype=torch.long))]
    plain = accord.merge(models, data, method="permutation", repair="none")
    repaired = accord.merge(models, data, method="permutation", repair="repair")
    assert repaired.report["repair"] == "repair"
    first_layer = []
    for state in repaired.aligned:
        endpoint = copy.deepcopy(models[0])
        endpoint.load_state_dict(state)
        first_layer.append(endpoint.layers[1](endpoint.layers[0](inputs)).detach())
    target_mean = torch.stack([o.mean(0) for o in first_layer]).mean(0)
    target_std = torch.stack([o.std(0, unbiased=False) for o in first_layer]).mean(0)
    with torch.no_grad():
        out = repaired.model.layers[1](repaired.model.layers[0](inputs))
        collapsed = plain.model.layers[1](plain.model.layers[0](inputs))
    assert torch.allclose(out.std(0, unbiased=False), target_std, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.mean(0), target_mean, rtol=1e-4, atol=1e-5)
    # Averaging shrank the unrepaired channels' spread.
    assert (collapsed.std(0) < target_std).float().mean() > 0.5


def test_mismatched_architectures_name_the_parameter() -> None:
    a = accord.build_model("mlp", width=8, depth=1)
    b = accord.build_model("mlp", width=9, depth=1)
    with pytest.raises(accord.MergeError, match=r"layers\.1\.weight"):
        check_compatible([a, b])
    with pytest.raises(accord.MergeError, match="at least one model"):
        accord.merge([], None)


def test_data_methods_without_data_are_refused() -> None:
    a = accord.build_model("mlp", width=8, depth=1)
    with pytest.raises(accord.MergeError, match="needs data"):
        accord.merge([a, copy.deepcopy(a)], None, method="cca")
    with pytest.raises(accord.MergeError, match="did you mean 'cca'"):
        accord.merge([a, copy.deepcopy(a)], None, method="cac")


def _labelled_mlps(
    samples: int,
) -> tuple[list[nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two small MLPs and batches of 32 inputs labelled by the first one's predictions."""
    torch.manual_seed(0)
    models = [
        accord.build_model("mlp", width=16, depth=1, in_channels=1, image_size=4) for _ in range(2)
    ]
    inputs = torch.randn(samples, 1, 4, 4)
    labels = models[0](inputs).argmax(1).detach()
    return models, [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, samples, 32)]


def test_npmerge_starts_from_its_alignment_and_learns() -> None:
    models, data = _labelled_mlps(128)
    aligned = accord.merge(models, data, method="permutation", repair="none")
    untrained = accord.merge(models, data, method="npmerge", align="permutation", epochs=0)
    for key, value in aligned.model.state_dict().items():
        assert torch.allclose(untrained.model.state_dict()[key], value, atol=1e-6)
    learned = accord.merge(models, data, method="npmerge", align="permutation", epochs=5, lr=0.1)
    report = learned.report["npmerge"]
    assert (
        learned.report["alignment"] == "permutation" and report["losses"][-1] < report["losses"][0]
    )
    assert (
        accord.evaluate(learned.model, data).accuracy
        >= accord.evaluate(aligned.model, data).accuracy
    )


def test_npmerge_auto_starts_from_the_tuned_alignment() -> None:
    models, batches = _labelled_mlps(96)
    data, validation = batches[:2], batches[2:]
    # no BatchNorm: NP Merge's repair="auto" would skip the REPAIR that CCA's applies
    tuned = {"options": "auto", "validation": validation, "repair": "none"}
    cca = accord.merge(models, data, "cca", **tuned)
    learned = accord.merge(models, data, "npmerge", align="cca", epochs=0, **tuned)
    assert learned.report["options"]["ridge"] == cca.report["options"]["ridge"]
    *alignment, own = learned.report["tuning"]
    assert alignment == cca.report["tuning"] and own["options"] == {"epochs": 0}
    for key, value in cca.model.state_dict().items():
        assert torch.allclose(learned.model.state_dict()[key], value, atol=1e-6)


def test_npmerge_keeps_the_plain_average_when_training_hurts_validation() -> None:
    """Calibration labels that contradict the validation split: every trained pass scores below
    the start there, so early stopping keeps pass 0, the aligned average, and options="auto"
    finds the trained candidate level with epochs=0."""
    models, batches = _labelled_mlps(160)
    validation = batches[3:]
    wrong = [(inputs, (labels + 1) % 10) for inputs, labels in batches[:3]]
    tuned = {"options": "auto", "validation": validation, "repair": "none"}
    result = accord.merge(models, wrong, "npmerge", epochs=20, lr=0.5, **tuned)
    trained, untrained = result.report["tuning"][-2:]
    assert trained["options"] == {"epochs": 20} and untrained["options"] == {"epochs": 0}
    assert trained["val_accuracy"] == untrained["val_accuracy"]
    [stage] = result.report["npmerge"]["stages"]
    assert len(stage["validation"]) == 21 and stage["kept_pass"] == 0
    assert max(stage["validation"][1:]) < stage["validation"][0] == untrained["val_accuracy"]
    assert accord.evaluate(result.model, validation).accuracy == untrained["val_accuracy"]


def test_folded_aligned_states_work_after_a_batchnorm_reset() -> None:
    """Under batchnorm="fold" each aligned state carries its own model's BatchNorm targets:
    the reference's (identity maps) is the reference again after a reset."""
    model = _model("vgg11-bn")
    data = _data(model)
    torch.manual_seed(1)
    other = accord.build_model("vgg11", **ARCHITECTURES["vgg11-bn"])
    accord.reset_batchnorm(other, data)
    result = accord.merge([model, other], data, "cca", batchnorm="fold")
    assert result.report["dense_spaces"]
    aligned = copy.deepcopy(model)
    aligned.load_state_dict(result.aligned[0])
    accord.reset_batchnorm(aligned, data)
    # not 1e-6: the targets are unbiased variances and a reset normalises by biased batch
    # ones, a factor n/(n-1) per layer with n = 512 samples at the deepest ones (a stale
    # neutral BatchNorm instead gives a difference above 1)
    assert _relative_difference(model, aligned, data[0][0]) < 2e-2


def test_npmerge_on_folded_batchnorms_trains_from_the_averaged_merge() -> None:
    """Under CCA's folded BatchNorms NP Merge trains aligned states that carry their BatchNorm
    targets: its first loss (the start, BatchNorm on the batch) is the loss of CCA's averaged
    merge after its reset on that batch (measured: 0.07 % apart; with the folded identity
    BatchNorms it trained before, 6 %)."""
    model = _model("vgg11-bn")
    data = _data(model)
    torch.manual_seed(1)
    other = accord.reset_batchnorm(accord.build_model("vgg11", **ARCHITECTURES["vgg11-bn"]), data)
    averaged = accord.merge([model, other], data, "cca")
    learned = accord.merge([model, other], data, "npmerge", align="cca", epochs=1)
    assert learned.report["dense_spaces"] and learned.report["repair"] == "bn-reset"
    inputs, labels = data[0]
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(averaged.model.eval()(inputs), labels).item()
    assert learned.report["npmerge"]["losses"][0] == pytest.approx(start, rel=1e-2)


def test_batchnorm_statistics_are_collected_only_for_dense_maps() -> None:
    model = _model("vgg11-bn")
    data = _data(model)
    torch.manual_seed(1)
    other = accord.reset_batchnorm(accord.build_model("vgg11", **ARCHITECTURES["vgg11-bn"]), data)
    permuted = accord.merge([model, other], data, "permutation")
    assert permuted.statistics is not None and permuted.statistics.norms == {}
    cca = accord.merge([model, other], data, "cca")
    assert cca.statistics is not None and cca.statistics.norms and cca.report["dense_spaces"]
    with pytest.raises(accord.MergeError, match="batchnorms=True"):
        accord.merge([model, other], data, "cca", statistics=permuted.statistics)


def test_which_merges_need_batchnorm_statistics() -> None:
    from accord.batchnorm import needs_batchnorm_statistics

    assert not needs_batchnorm_statistics("permutation", "fold")
    assert not needs_batchnorm_statistics("weight_matching", "fold")
    assert needs_batchnorm_statistics("cca", "fold")
    assert needs_batchnorm_statistics("zipit", "fold")
    assert needs_batchnorm_statistics("npmerge", "fold")  # its default alignment: CCA
    assert not needs_batchnorm_statistics("cca", "transform")


def _with_value(model: nn.Module, key: str, value: float) -> nn.Module:
    broken = copy.deepcopy(model)
    broken.state_dict()[key].view(-1)[0] = value
    return broken


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["identity", "weight_matching", "cca", "npmerge"])
def test_non_finite_weights_are_refused_naming_model_and_tensor(method: str, value: float) -> None:
    model = _model("mlp")
    data = _data(model)
    broken = _with_value(model, "layers.3.weight", value)
    kind = "NaN" if math.isnan(value) else "inf"
    with pytest.raises(
        accord.MergeError, match=rf"model 1: tensor 'layers\.3\.weight' has 1 {kind}"
    ):
        accord.merge([model, broken], data, method=method)


def _register_maps(monkeypatch: pytest.MonkeyPatch, entry: float) -> None:
    """A matcher "broken_maps" whose map of space ``layers.1`` for model 1 has one ``entry``."""
    from accord.match import MATCHERS, Alignment
    from accord.match._common import identity_transforms
    from accord.registry import AlignMethod

    def broken(spec, statistics, states, reference):  # type: ignore[no-untyped-def]
        transforms = identity_transforms(spec, len(states))
        matrix = torch.eye(spec["layers.1"].size, dtype=torch.float64)
        matrix[0, 1] = entry
        transforms[1]["layers.1"] = accord.Transform(matrix, matrix.clone())
        report = {"layers.1": {"method": "broken_maps", "notes": [], "models": {}}}
        return Alignment(transforms, report)

    monkeypatch.setitem(
        MATCHERS,
        "broken_maps",
        AlignMethod("broken_maps", broken, paper="-", label="broken maps"),
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (float("nan"), r"broken_maps map of space 'layers\.1' for model 1 has 1 NaN among 576"),
        (1e300, r"model 1 aligned to the reference: tensor 'layers\.\d\.weight' has \d+ inf"),
    ],
    ids=["nan-map", "huge-map"],
)
def test_a_merge_that_turns_non_finite_names_the_tensor_and_the_stage(
    monkeypatch: pytest.MonkeyPatch, entry: float, message: str
) -> None:
    _register_maps(monkeypatch, entry)
    model = _model("mlp")
    data = _data(model)
    torch.manual_seed(1)
    other = accord.build_model("mlp", **ARCHITECTURES["mlp"])
    with pytest.raises(accord.MergeError, match=message):
        accord.merge([model, other], data, method="broken_maps", repair="none")


def test_a_repair_that_overflows_is_an_error_naming_the_tensor() -> None:
    model = _model("vgg11-bn")
    # finite inputs whose squares overflow float32: the BatchNorm reset's running variances
    huge = [(inputs * 1e30, labels) for inputs, labels in _data(model)]
    with pytest.raises(
        accord.MergeError, match=r"after the repair \('bn-reset'\): tensor '.*running_var' has"
    ):
        accord.merge([model, copy.deepcopy(model)], huge, method="identity", repair="bn-reset")


def test_non_finite_statistics_are_refused_naming_the_space() -> None:
    model = _model("mlp")
    data = _data(model)
    spec = accord.trace(model, data[0][0][:2])
    twin = accord.randomly_permuted(model, spec, seed=2)
    # activations near 1e19 are finite, their float32 products are not
    huge = [(inputs * 1e19, labels) for inputs, labels in data]
    with pytest.raises(accord.StatisticsError, match=r"space 'layers\.1': Cov\(model 0, model 0\)"):
        accord.collect_statistics([model, twin], huge, spec, progress=False, precision="float32")
    stats = accord.collect_statistics([model, twin], data, spec, progress=False)
    stats.spaces["layers.3"].blocks[(0, 1)][2, 2] = float("nan")
    with pytest.raises(accord.MergeError, match=r"statistics of space 'layers\.3' are not finite"):
        accord.merge([model, twin], data, "cca", spec=spec, statistics=stats)


@pytest.mark.parametrize("method", ["identity", "cca"])
def test_models_of_two_dtypes_are_refused_naming_both(method: str) -> None:
    model = _model("mlp")
    double = copy.deepcopy(model).double()
    with pytest.raises(
        accord.MergeError,
        match=r"'layers\.1\.weight' is torch\.float64 in model 1 but torch\.float32",
    ):
        accord.merge([model, double], _data(model), method=method)


def test_data_of_another_dtype_than_the_models_is_refused() -> None:
    models = [copy.deepcopy(_model("mlp")).double() for _ in range(2)]
    data = _data(models[0])
    with pytest.raises(
        accord.MergeError,
        match=r"data gives torch\.float32 inputs but the models' parameters are torch\.float64",
    ):
        accord.merge(models, data, method="cca")
    double = [(inputs.double(), labels) for inputs, labels in data]
    result = accord.merge(models, double, method="cca")
    assert _relative_difference(models[0], result.model, double[0][0]) <= 1e-6


def test_dense_maps_on_batchnorm_spaces_without_repair_keep_identity_batchnorms() -> None:
    """repair="none": each folded BatchNorm is the identity plus the merged shift, the merged
    weights are the average of the aligned ones, and no BatchNorm statistics are collected."""
    model = _model("vgg11-bn")
    data = _data(model)
    torch.manual_seed(1)
    other = accord.reset_batchnorm(accord.build_model("vgg11", **ARCHITECTURES["vgg11-bn"]), data)
    result = accord.merge([model, other], data, "cca", repair="none")
    assert result.report["dense_spaces"] and result.statistics is not None
    assert result.statistics.norms == {}
    merged = result.model.state_dict()
    average = average_states(result.aligned)
    assert all(torch.equal(merged[k], v) for k, v in average.items())
    norms = [
        bn.norm for name in result.report["dense_spaces"] for bn in result.spec[name].batchnorms
    ]
    assert norms
    for norm in norms:
        eps = dict(result.model.named_modules())[norm].eps
        assert torch.equal(merged[f"{norm}.weight"], torch.ones_like(merged[f"{norm}.weight"]))
        assert torch.equal(merged[f"{norm}.running_mean"], torch.zeros_like(merged[f"{norm}.bias"]))
        assert torch.equal(
            merged[f"{norm}.running_var"], torch.full_like(merged[f"{norm}.bias"], 1 - eps)
        )
    # the reference, aligned by identity maps with its BatchNorms folded, is itself
    reference = copy.deepcopy(model)
    reference.load_state_dict(result.aligned[0])
    assert _relative_difference(model, reference, data[0][0]) < 1e-5
    spec = accord.trace(model, data[0][0][:2])
    twin = accord.randomly_permuted(model, spec, seed=3)
    recovered = accord.merge([model, twin], data, "cca", spec=spec, repair="none")
    assert _relative_difference(model, recovered.model, data[0][0]) <= 1e-4


def _resnets(count: int, width: float, data: list) -> list[nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = accord.build_model("resnet20", width=width, in_channels=1, image_size=8)
        models.append(accord.reset_batchnorm(model, data))
    return models


# 4 ResNet20s at width 1 are the merge that failed; the others cost a minute together
@pytest.mark.parametrize(
    ("count", "width"),
    [(4, 1), (3, 0.5)]
    + [
        pytest.param(n, w, marks=pytest.mark.slow)
        for n in (2, 3, 4, 5)
        for w in (0.5, 1)
        if (n, w) not in ((4, 1), (3, 0.5))
    ],
)
def test_zipit_defaults_merge_any_number_of_resnets(count: int, width: float) -> None:
    """Random-init ResNet20s: ZipIt!'s defaults (α = 0.3, β = 0.125) zip every space."""
    data = _data(_model("resnet20"), samples=32)
    models = _resnets(count, width, data)
    result = accord.merge(models, data, method="zipit")
    zipped = {n: r for n, r in result.report["spaces"].items() if r["method"] == "zipit"}
    assert zipped
    for name, report in zipped.items():
        size = result.spec[name].size
        merges = report["merges"]
        assert merges["cross_model"] + merges["within_model"] == (count - 1) * size
        for transforms in result.transforms:
            # every feature of every model lies in exactly one of the `size` clusters
            unmerge = transforms[name].inverse
            assert torch.equal(unmerge.sum(1), torch.ones(size, dtype=torch.float64))
    with torch.no_grad():
        assert torch.isfinite(result.model(data[0][0])).all()
