"""Tests of accord.statistics against direct float64 computations on stored activations."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import accord.statistics.accumulator
from accord.errors import StatisticsError
from accord.match import block_correlation
from accord.spec import FeatureSpace, FoldedNorm, Observation, Spec
from accord.statistics import SpaceStatistics, Statistics, collect_statistics
from accord.trace import trace
from accord.trace.export import batchnorm_nodes
from accord.trace.observe import observed_model
from accord.zoo import build_model

sys.path.insert(0, str(Path(__file__).parent))
import _dist_stats_worker as worker
from _counted import CountedBatches

pytestmark = pytest.mark.usefixtures("single_thread")

# A space's observations: the names of the modules whose outputs are observed.
Points = Sequence[str]

# float64 products of the models run as given (no channels-last convolutions, no BatchNorm
# fused into its convolution): what the direct float64 computations below agree with to
# 1e-10. The default (float32 products) has its own tests at the tolerance float32 products
# with a shift must meet.
EXACT = {"precision": "float64", "channels_last": False, "fuse_batchnorms": False}


def _mlps(num_models: int = 3, width: int = 10) -> list[nn.Module]:
    models = []
    for seed in range(num_models):
        torch.manual_seed(seed)
        models.append(
            nn.Sequential(
                nn.Linear(6, width),
                nn.ReLU(),
                nn.Linear(width, width),
                nn.ReLU(),
                nn.Linear(width, 3),
            )
        )
    return models


def _mlp_spec(width: int = 10) -> Spec:
    return Spec(
        [
            FeatureSpace("input", 6, free=False, reason="network input"),
            FeatureSpace("h1", width, observe=(Observation("_1", 1),)),
            FeatureSpace("h2", width, observe=(Observation("_3", 1),)),
            FeatureSpace("unobserved", 3),
            FeatureSpace("logits", 3, observe=(Observation("_4", 1),), free=False),
        ]
    )


MLP_POINTS = {"h1": ["1"], "h2": ["3"]}


def _convs(num_models: int = 3) -> list[nn.Module]:
    models = []
    for seed in range(num_models):
        torch.manual_seed(seed)
        models.append(
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 6, 3),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(3),
                nn.Flatten(),
                nn.Linear(6 * 3 * 3, 4),
            )
        )
    return models


def _conv_spec() -> Spec:
    return Spec(
        [
            FeatureSpace("c1", 8, observe=(Observation("_1", 1),)),
            FeatureSpace("c2", 6, observe=(Observation("_3", 1),)),
        ]
    )


CONV_POINTS = {"c1": ["1"], "c2": ["3"]}


def _batches(shape: tuple[int, ...], sizes: Sequence[int], seed: int = 0) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=generator) + 1, torch.zeros(n)) for n in sizes]


def _activations(model: nn.Module, batches: Sequence[tuple], points: Points) -> np.ndarray:
    """Samples (rows) × features of a space, from forward hooks on the observed modules."""
    stored: list[torch.Tensor] = []
    # clone: a later in-place op (ReLU(inplace=True)) must not change what was observed
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out: stored.append(out.detach().clone())
        )
        for name in points
    ]
    model.eval()
    with torch.no_grad():
        for inputs, _labels in batches:
            model(inputs)
    for hook in hooks:
        hook.remove()
    rows = [t.movedim(1, -1).reshape(-1, t.shape[1]).double().numpy() for t in stored]
    return np.concatenate(rows)


def _direct(
    models: Sequence[nn.Module], batches: Sequence[tuple], points: Points
) -> tuple[np.ndarray, np.ndarray]:
    """Means (N, C) and the joint covariance (N·C × N·C) by numpy in float64."""
    xs = [_activations(model, batches, points) for model in models]
    return np.stack([x.mean(0) for x in xs]), np.cov(np.concatenate(xs, axis=1), rowvar=False)


def _assert_close(got: torch.Tensor, want: np.ndarray, rtol: float) -> None:
    error = np.abs(got.numpy() - want).max()
    assert error <= rtol * np.abs(want).max(), f"error {error:.3g} vs scale {np.abs(want).max()}"


def _assert_matches_direct(
    stats: SpaceStatistics, models: Sequence[nn.Module], batches: Sequence[tuple], points: Points
) -> None:
    mean, cov = _direct(models, batches, points)
    c = stats.size
    _assert_close(stats.mean, mean, 1e-10)
    for i, j in stats.blocks:
        _assert_close(stats.covariance(i, j), cov[i * c : (i + 1) * c, j * c : (j + 1) * c], 1e-10)
        _assert_close(stats.covariance(j, i), cov[j * c : (j + 1) * c, i * c : (i + 1) * c], 1e-10)


def _assert_equal(a: Statistics, b: Statistics, rtol: float = 0.0) -> None:
    assert (a.num_models, a.reference, a.pairs) == (b.num_models, b.reference, b.pairs)
    for group_a, group_b in ((a.spaces, b.spaces), (a.norms, b.norms)):
        assert list(group_a) == list(group_b)
        for name, x in group_a.items():
            y = group_b[name]
            assert x.count == y.count and set(x.blocks) == set(y.blocks)
            for got, want in [(x.mean, y.mean)] + [(x.blocks[k], y.blocks[k]) for k in x.blocks]:
                if rtol == 0:
                    assert torch.equal(got, want), name
                else:
                    _assert_close(got, want.numpy(), rtol)


@pytest.mark.parametrize("pairs", ["reference", "all"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_matches_direct_float64(net: str, pairs: str) -> None:
    if net == "mlp":
        models, spec, points, data = _mlps(), _mlp_spec(), MLP_POINTS, _batches((6,), [50, 30])
    else:
        models, spec, points, data = (
            _convs(),
            _conv_spec(),
            CONV_POINTS,
            _batches((3, 5, 5), [7, 5]),
        )
    stats = collect_statistics(
        models, data, spec, reference=1, pairs=pairs, progress=False, **EXACT
    )
    assert set(stats.spaces) == set(points) and (stats.num_models, stats.reference) == (3, 1)
    expected = {(0, 0), (1, 1), (2, 2), (0, 1), (1, 2)} | ({(0, 2)} if pairs == "all" else set())
    for name, space_points in points.items():
        assert set(stats.spaces[name].blocks) == expected
        _assert_matches_direct(stats.spaces[name], models, data, space_points)
    # every spatial position is a sample
    first = next(iter(points))
    assert stats.spaces[first].count == {"mlp": 80, "conv": 12 * 25}[net]
    if pairs == "reference":
        with pytest.raises(KeyError, match="pairs='all'"):
            stats.spaces[first].covariance(0, 2)


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "channels_last", "mixed"])
def test_conv_layouts(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(N, C, H·W) activations, whole or in memory-bounded chunks; channels-last ones;
    models whose activations have different memory formats (the reference's decides)."""
    if layout == "chunked":
        monkeypatch.setattr(accord.statistics.accumulator, "CHUNK_ELEMENTS", 3 * 8 * 8)
    models, data = _convs(), _batches((3, 10, 10), [7, 4])
    if layout == "channels_last":
        models = [m.to(memory_format=torch.channels_last) for m in models]
        data = [(x.to(memory_format=torch.channels_last), y) for x, y in data]
    if layout == "mixed":
        models[0].to(memory_format=torch.channels_last)
    stats = collect_statistics(models, data, _conv_spec(), pairs="all", progress=False, **EXACT)
    for name, points in CONV_POINTS.items():
        _assert_matches_direct(stats.spaces[name], models, data, points)


def test_pooled_observation_points() -> None:
    """A space observed at two nodes (a residual stream): positions of both are samples."""
    models, data = _mlps(), _batches((6,), [40, 20])
    spec = Spec([FeatureSpace("stream", 10, observe=(Observation("_1", 1), Observation("_3", 1)))])
    stats = collect_statistics(models, data, spec, progress=False, **EXACT)
    assert stats.spaces["stream"].count == 120
    _assert_matches_direct(stats.spaces["stream"], models, data, ["1", "3"])


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["mlp", "conv", "conv-chunked", "conv-channels-last"])
def test_spaces_of_blocks_keep_the_full_covariances_entrywise(
    layout: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Features of several entries (whole attention heads) keep only the covariances of entries
    at one position of two features: those of the full covariance, and the block correlation
    the matching reads is the full correlation's, averaged over each pair of blocks."""
    if layout == "mlp":  # (samples, entries) rows
        models, data, node, points = _mlps(), _batches((6,), [50, 30]), "_0", ["0"]
        size, block = 2, 5
    else:  # (N, C, H·W) columns; channels-last: rows again
        models, data, node, points = _convs(), _batches((3, 5, 5), [7, 5]), "_0", ["0"]
        size, block = 4, 2
    if layout == "conv-chunked":
        monkeypatch.setattr(accord.statistics.accumulator, "CHUNK_ELEMENTS", 8 * 5 * 5)
    if layout == "conv-channels-last":
        models = [m.to(memory_format=torch.channels_last) for m in models]
        data = [(x.to(memory_format=torch.channels_last), y) for x, y in data]
    spec = Spec([FeatureSpace("heads", size, observe=(Observation(node, 1, None, block),))])
    exact = {"precision": precision, "channels_last": False, "fuse_batchnorms": False}
    stats = collect_statistics(models, data, spec, progress=False, reference=1, **exact)
    space = stats.spaces["heads"]
    mean, cov = _direct(models, data, points)
    rtol = 1e-10 if precision == "float64" else 1e-5
    _assert_close(space.mean, mean, rtol)
    n = size * block
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    for i, j in [(1, 1), (0, 1), (1, 0), (2, 1), (0, 0)]:
        full = cov[i * n : (i + 1) * n, j * n : (j + 1) * n].reshape(size, block, size, block)
        entries = np.moveaxis(np.diagonal(full, axis1=1, axis2=3), -1, 0)  # (block, F, F)
        _assert_close(space.entry_covariance(i, j, block), entries, rtol)
        # what block_correlation computed from the full covariance before
        whole = corr[i * n : (i + 1) * n, j * n : (j + 1) * n].reshape(size, block, size, block)
        expected = np.diagonal(whole, axis1=1, axis2=3).mean(-1)
        got = block_correlation(space, i, j, spec["heads"])
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=rtol)
    # (block, F, F) per pair instead of (F·block)²: block times fewer values
    assert all(b.shape == (block, size, size) for b in space.blocks.values())
    with pytest.raises(StatisticsError, match="entry_covariance"):
        space.covariance(0, 1)


def test_spaces_of_blocks_save_load_and_old_full_statistics_give_one_block_correlation(
    tmp_path: Path,
) -> None:
    models, data = _mlps(2), _batches((6,), [60])
    heads = FeatureSpace("heads", 2, observe=(Observation("_0", 1, None, 5),))
    # an entry-by-entry space of the same node: the full covariances statistics kept before
    whole = FeatureSpace("whole", 10, observe=(Observation("_0", 1),))
    stats = collect_statistics(models, data, Spec([heads, whole]), progress=False, **EXACT)
    assert (stats.spaces["heads"].block, stats.spaces["whole"].block) == (5, 1)
    stats.save(tmp_path / "stats.safetensors")
    loaded = Statistics.load(tmp_path / "stats.safetensors")
    _assert_equal(loaded, stats)
    assert loaded.spaces["heads"].block == 5
    reduced = block_correlation(loaded.spaces["heads"], 0, 1, heads)
    full = block_correlation(loaded.spaces["whole"], 0, 1, heads)
    torch.testing.assert_close(reduced, full, rtol=0, atol=1e-12)
    with pytest.raises(StatisticsError, match="blocks of 2"):
        loaded.spaces["heads"].entry_covariance(0, 1, 2)
    # a format-1 file kept a head space's full covariances, and no block: it still loads
    old = Statistics({"heads": stats.spaces["whole"]}, 2)
    old.save(tmp_path / "old.safetensors")
    _rewrite_metadata(tmp_path / "old.safetensors", format=1, without="block")
    from_old = Statistics.load(tmp_path / "old.safetensors").spaces["heads"]
    assert from_old.block == 1
    torch.testing.assert_close(
        block_correlation(from_old, 0, 1, heads), reduced, atol=1e-12, rtol=0
    )


def _rewrite_metadata(path: Path, format: int, without: str) -> None:
    """The statistics file at ``path`` as an older accord wrote it: ``format``, and no
    ``without`` key in its space entries."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["accord"])
    meta["format"] = format
    for entry in meta["spaces"] + meta["norms"]:
        del entry[without]
    save_file(load_file(str(path)), str(path), metadata={"accord": json.dumps(meta)})


def _graph_outputs(
    models: Sequence[nn.Module], batches: Sequence[tuple], nodes: Sequence[str]
) -> list[list[dict[str, torch.Tensor]]]:
    """Per model, per batch: the outputs of ``nodes`` of the exported graph, from
    accord.trace.observe.observed_model."""
    outputs = []
    for model in models:
        graph = observed_model(model, nodes, batches[0][0]).eval()
        with torch.no_grad():
            outputs.append([graph(inputs)[1] for inputs, _ in batches])
    return outputs


def _rows(outputs: Sequence[dict[str, torch.Tensor]], points: Sequence[Observation]) -> np.ndarray:
    """One model's samples × features at ``points``: all positions of every point pool."""
    rows = [
        out[p.node].movedim(p.axis, -1).reshape(-1, out[p.node].shape[p.axis]).double()
        for p in points
        for out in outputs
    ]
    return torch.cat(rows).numpy()


def _random_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters far from a fresh BatchNorm's identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1, generator=generator)
            module.running_var.uniform_(0.3, 3, generator=generator)
            module.weight.data.uniform_(0.3, 2, generator=generator)
            module.bias.data.uniform_(-1, 1, generator=generator)
    return model


@pytest.mark.filterwarnings("ignore:.*samples for .* features")  # deep 2×2 maps, 10 images
@pytest.mark.parametrize(
    ("name", "default"), [("resnet20", False), ("resnet20", True), ("vit", False)]
)
def test_traced_zoo_models_match_observed_graph(name: str, default: bool) -> None:
    """spec=None traces the model; residual streams pool several observation points. As
    merges collect them (``default``: float32 products, channels-last convolutions,
    BatchNorms fused into them), the statistics are those of the graph as exported up to
    float32 rounding."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        extra = {"patch_size": 4} if name == "vit" else {}
        models.append(_random_batchnorms(build_model(name, image_size=8, **extra), seed))
    data = _batches((3, 8, 8), [6, 4])
    options, rtol = ({}, 1e-5) if default else (EXACT, 1e-10)
    stats = collect_statistics(models, data, pairs="all", progress=False, **options)
    spec = trace(models[0], data[0][0])
    assert spec.graph == "export"
    spaces = {s.name: s for s in spec.free_spaces if s.observe}
    assert set(stats.spaces) == set(spaces) and any(len(s.observe) > 1 for s in spaces.values())
    norms = {bn.norm for s in spaces.values() for bn in s.batchnorms}
    assert set(stats.norms) == norms and (name == "vit" or norms)
    groups = [(stats.spaces[k], spaces[k].observe) for k in spaces]
    norm_nodes = batchnorm_nodes(models[0], data[0][0], sorted(norms))
    groups += [(stats.norms[k], tuple(Observation(n, 1) for n in norm_nodes[k])) for k in norms]
    outputs = _graph_outputs(models, data, [p.node for _, points in groups for p in points])
    for got, points in groups:
        xs = [_rows(model_outputs, points) for model_outputs in outputs]
        cov, c = np.cov(np.concatenate(xs, axis=1), rowvar=False), got.size
        _assert_close(got.mean, np.stack([x.mean(0) for x in xs]), rtol)
        for i, j in got.blocks:
            _assert_close(got.blocks[(i, j)], cov[i * c : (i + 1) * c, j * c : (j + 1) * c], rtol)


def test_batch_sizes_do_not_matter() -> None:
    # float64 models: a float32 forward itself rounds differently for other batch sizes
    models, spec = [m.double() for m in _convs()], _conv_spec()
    data = [(x.double(), y) for x, y in _batches((3, 5, 5), [1, 6, 2, 9, 3])]
    whole = torch.cat([x for x, _ in data])
    split = collect_statistics(models, data, spec, pairs="all", progress=False)
    # bare tensors and (inputs,) tuples are batches too
    one = collect_statistics(models, [whole], spec, pairs="all", progress=False)
    one_tuple = collect_statistics(models, [(whole,)], spec, pairs="all", progress=False)
    _assert_equal(split, one, rtol=1e-12)
    _assert_equal(one, one_tuple)


def test_float32_products_are_the_default_close_and_recorded(tmp_path: Path) -> None:
    models, data = _convs(), _batches((3, 10, 10), [7, 4])
    exact = collect_statistics(models, data, _conv_spec(), pairs="all", progress=False, **EXACT)
    fast = collect_statistics(models, data, _conv_spec(), pairs="all", progress=False)
    assert (exact.precision, fast.precision) == ("float64", "float32")
    for name, space in exact.spaces.items():
        for pair, block in space.blocks.items():
            got = fast.spaces[name].blocks[pair]
            assert got.dtype == torch.float64
            assert float((got - block).norm() / block.norm()) < 1e-5, (name, pair)
    fast.save(tmp_path / "fast.safetensors")
    assert Statistics.load(tmp_path / "fast.safetensors").precision == "float32"
    with pytest.raises(StatisticsError, match=r"precision='float16' must be"):
        collect_statistics(models, data, _conv_spec(), precision="float16")  # type: ignore[arg-type]


def test_float32_products_keep_precision_at_a_large_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Features of mean ~1e3 and std ~1, in several chunks per batch: float32 products of
    shifted chunks summed in float64 stay within 1e-5 of the exact covariances, where a raw
    float32 E[xxᵀ] − μμᵀ is off by ~1e-2 (it is checked to be, so the test can fail)."""
    monkeypatch.setattr(accord.statistics.accumulator, "CHUNK_ELEMENTS", 5 * 300)
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        layer = nn.Linear(4, 5)
        layer.weight.data.normal_(0, 0.5)  # std ~1 per feature: inputs are N(1, 1)
        layer.bias.data.fill_(1e3)
        models.append(nn.Sequential(layer))
    data = _batches((4,), [1000, 700, 1300], seed=1)
    spec = Spec([FeatureSpace("z", 5, observe=(Observation("_0", 1),))])
    got = collect_statistics(models, data, spec, progress=False).spaces["z"]
    xs = [_activations(model, data, ["0"]) for model in models]
    mean, cov = np.stack([x.mean(0) for x in xs]), np.cov(np.concatenate(xs, axis=1), rowvar=False)
    assert np.abs(mean).min() > 900 and 0.2 < np.sqrt(np.diag(cov)).min() < 5
    _assert_close(got.mean, mean, 1e-10)
    for i, j in got.blocks:
        _assert_close(got.covariance(i, j), cov[i * 5 : (i + 1) * 5, j * 5 : (j + 1) * 5], 1e-5)
    raw = torch.from_numpy(xs[0]).float()
    naive = raw.T @ raw / len(raw) - torch.outer(raw.mean(0), raw.mean(0))
    error = np.abs(naive.double().numpy() - cov[:5, :5] * (len(raw) - 1) / len(raw)).max()
    assert error > 1e-3 * np.abs(cov[:5, :5]).max()


def test_large_offset_keeps_precision() -> None:
    """Activations ~1e4 with spread ~0.1: a raw E[xxᵀ] − μμᵀ would lose ~6 digits."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        layer = nn.Linear(4, 5)
        layer.weight.data.mul_(0.1)
        layer.bias.data.fill_(1e4)
        models.append(nn.Sequential(layer))
    data = _batches((4,), [64, 64, 64])
    spec = Spec([FeatureSpace("z", 5, observe=(Observation("_0", 1),))])
    stats = collect_statistics(models, data, spec, progress=False, **EXACT)
    _assert_matches_direct(stats.spaces["z"], models, data, ["0"])


def test_max_samples_truncates_exactly() -> None:
    models, spec = [m.double() for m in _convs()], _conv_spec()
    data = [(x.double(), y) for x, y in _batches((3, 5, 5), [4, 4, 4, 4])]
    got = collect_statistics(models, data, spec, max_samples=6, progress=False, **EXACT)
    whole = [torch.cat([x for x, _ in data])[:6]]
    want = collect_statistics(models, whole, spec, progress=False, **EXACT)
    assert got.spaces["c1"].count == 6 * 25
    _assert_equal(got, want, rtol=1e-12)


def test_non_finite_activations_name_space_node_and_batch() -> None:
    data = _batches((6,), [8, 8, 8])
    data[2][0][3, 1] = float("nan")
    with pytest.raises(StatisticsError, match=r"space 'h1'.*node '_1' of model 0.*batch 2"):
        collect_statistics(_mlps(), data, _mlp_spec(), progress=False)


def test_fewer_samples_than_features_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_statistics(_mlps(), _batches((6,), [5]), _mlp_spec(), progress=False)
    assert [str(w.message).split(",")[0] for w in caught] == [
        f"space '{name}': 5 samples for 10 features" for name in ("h1", "h2")
    ]
    assert {w.filename for w in caught} == {__file__}
    assert stats.spaces["h1"].count == 5


def test_empty_data_and_bad_arguments_raise() -> None:
    with pytest.raises(StatisticsError, match="data is empty"):
        collect_statistics(_mlps(), [], _mlp_spec(), progress=False)
    with pytest.raises(StatisticsError, match=r"reference=3.*pairs='some'"):
        collect_statistics(_mlps(), [], _mlp_spec(), reference=3, pairs="some")  # type: ignore[arg-type]
    with pytest.raises(StatisticsError, match="expected a tensor"):
        collect_statistics(_mlps(), [[1, 2]], _mlp_spec(), progress=False)


def test_folding_a_missing_batchnorm_raises() -> None:
    spec = Spec(
        [FeatureSpace("c1", 6, batchnorms=(FoldedNorm("7", "0"),), observe=(Observation("_2", 1),))]
    )
    with pytest.raises(StatisticsError, match="the spec folds '7', which is not a BatchNorm"):
        collect_statistics(worker.conv_bn_models(), _batches((3, 6, 6), [4]), spec, progress=False)


def test_spec_of_another_model_raises() -> None:
    spec = Spec([FeatureSpace("h1", 7, observe=(Observation("_1", 1),))])
    with pytest.raises(
        StatisticsError, match=r"space 'h1': node '_1' of model 0 gives shape \(20, 10\)"
    ):
        collect_statistics(_mlps(), _batches((6,), [20]), spec, progress=False)


def test_batchnorm_outputs_and_model_state_restored() -> None:
    models, spec = worker.conv_bn_models(), worker.conv_bn_spec()
    for model in models:
        model.train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    data = _batches((3, 6, 6), [5, 7])
    stats = collect_statistics(models, data, spec, progress=False, **EXACT)
    for model, state in zip(models, before, strict=True):
        assert all(m.training for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert list(stats.norms) == ["1"]
    norm = stats.norms["1"]
    assert set(norm.blocks) == {(0, 0), (1, 1), (2, 2)} and norm.count == 12 * 36
    _assert_matches_direct(norm, models, data, ["1"])
    _assert_matches_direct(stats.spaces["c1"], models, data, ["2"])


def test_batchnorm_outputs_can_be_skipped() -> None:
    models, spec = worker.conv_bn_models(), worker.conv_bn_spec()
    data = _batches((3, 6, 6), [5, 7])
    full = collect_statistics(models, data, spec, progress=False)
    spaces_only = collect_statistics(models, data, spec, progress=False, batchnorms=False)
    assert spaces_only.norms == {} and list(full.norms) == ["1"]
    for key, block in full.spaces["c1"].blocks.items():
        assert torch.equal(spaces_only.spaces["c1"].blocks[key], block)


def test_save_load_round_trip(tmp_path: Path) -> None:
    stats = collect_statistics(
        worker.conv_bn_models(),
        _batches((3, 6, 6), [6]),
        worker.conv_bn_spec(),
        pairs="all",
        reference=2,
        progress=False,
    )
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]
    _assert_equal(Statistics.load(path), stats)
    with pytest.raises(StatisticsError, match="does not exist"):
        Statistics.load(tmp_path / "missing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsError, match="not a statistics file"):
        Statistics.load(tmp_path / "garbage.safetensors")


def test_docstring_examples() -> None:
    assert doctest.testmod(accord.statistics).failed == 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_match_one(tmp_path: Path) -> None:
    script = Path(worker.__file__)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--standalone", str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, kwargs in worker.cases().items():
        if name == "nan":
            # rank 1 hit the NaN; rank 0 raised too, with rank 1's message
            for rank in (0, 1):
                message = (tmp_path / f"nan-rank{rank}.txt").read_text()
                assert "node '_2' of model 0 in batch 1" in message
            assert (tmp_path / "nan-rank0.txt").read_text().startswith("rank 1: space 'c1'")
            continue
        got = Statistics.load(tmp_path / f"{name}.safetensors")
        # the ranks' sums of float32 chunk products are re-expressed around one shift in
        # float64: equal to one process's to float32 rounding; float64 products to 1e-10
        _assert_equal(got, collect_statistics(**kwargs), 1e-10 if "float64" in name else 1e-5)


def test_spec_traced_with_leaf_modules_is_observed_in_the_same_graph() -> None:
    from accord.trace import trace

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
            self.hidden = nn.Linear(6, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(self.inner(x))))

    models = [Gated() for _ in range(2)]
    spec = trace(models[0], torch.randn(3, 4), leaf_modules=["inner"])
    assert spec.leaf_modules == ("inner",)
    stats = collect_statistics(models, [torch.randn(32, 4)], spec, progress=False)
    assert set(stats.spaces) == {"hidden"}
    assert stats.spaces["hidden"].count == 32


def _coordinate_mlp() -> nn.Module:
    """Hidden units fed a 2-d input with biases that keep every ReLU open: each unit is an
    affine function of the same two numbers, so many pairs correlate within 1e-4 of 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, 3))
    with torch.no_grad():
        model[0].bias.fill_(10.0)
    return model.eval()


def test_nearly_dependent_features_are_collected_in_float64() -> None:
    import accord
    from accord.statistics.collect import near_dependent_spaces

    model = _coordinate_mlp()
    x = torch.rand(1024, 2)
    spec = trace(model, x[:2])
    twin = accord.randomly_permuted(model, spec, seed=1).eval()
    data = [(x[i : i + 256],) for i in range(0, 1024, 256)]
    exact = collect_statistics([model, twin], data, spec, precision="float64", progress=False)
    assert near_dependent_spaces(exact) == list(exact.spaces)
    counted = CountedBatches(data)
    refined = collect_statistics([model, twin], counted, spec, progress=False)
    assert refined.precision == "float32"
    assert counted.drawn == [2, 2, 2, 2]  # the float32 pass and the float64 one
    for name, space in exact.spaces.items():
        for pair, block in space.blocks.items():
            # float32 products would differ near 1e-7 relative; the second pass is float64
            torch.testing.assert_close(refined.spaces[name].blocks[pair], block, rtol=1e-12, atol=0)
    merged = accord.merge([model, twin], data, "permutation", spec=spec, repair="none")
    assert all(torch.equal(merged.model.state_dict()[k], v) for k, v in model.state_dict().items())


def test_rank_deficient_features_are_collected_in_float64() -> None:
    """16 pre-activations of a 3-d input span 3 directions, no two of them nearly collinear:
    float32 products leave the two models' joint covariance indefinite (canonical
    correlations far above 1 under a small ridge); the second pass in float64 keeps it
    positive semi-definite, so they stay within [0, 1]."""
    import accord
    from accord.match.cca import spd_roots
    from accord.statistics.collect import near_dependent_spaces

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(4096, 3) * 100 + 50  # far from zero: rounding is large against the signal
    spec = trace(model, x[:2], observe="pre")
    twin = accord.randomly_permuted(model, spec, seed=1).eval()
    data = [(x[i : i + 512],) for i in range(0, 4096, 512)]
    exact = collect_statistics([model, twin], data, spec, precision="float64", progress=False)
    (name,) = exact.spaces
    correlation = exact.spaces[name].correlation(0, 0).abs()
    assert float((correlation - torch.eye(16)).max()) < 1 - 1e-3  # no pair is near ±1
    assert near_dependent_spaces(exact) == [name]
    refined = collect_statistics([model, twin], data, spec, progress=False)
    space = refined.spaces[name]
    for pair, block in exact.spaces[name].blocks.items():
        torch.testing.assert_close(space.blocks[pair], block, rtol=1e-12, atol=0)
    sxx, syy, sxy = space.covariance(0, 0), space.covariance(1, 1), space.covariance(0, 1)
    eye = torch.eye(16, dtype=torch.float64)
    wx = spd_roots(sxx + 1e-9 * sxx.trace() / 16 * eye)[1]
    wy = spd_roots(syy + 1e-9 * syy.trace() / 16 * eye)[1]
    correlations = torch.linalg.svdvals(wx @ sxy @ wy)
    assert float(correlations.max()) <= 1 + 1e-6
    assert float(correlations[2]) > 0.999  # the twin's 3 directions are the model's


def test_nearly_dependent_features_from_a_one_shot_iterator_warn() -> None:
    import accord

    model = _coordinate_mlp()
    x = torch.rand(128, 2)
    spec = trace(model, x[:2])
    twin = accord.randomly_permuted(model, spec, seed=1).eval()
    with pytest.warns(UserWarning, match="one-shot iterator"):
        stats = collect_statistics(
            [model, twin], iter([(x[:64],), (x[64:],)]), spec, progress=False
        )
    assert stats.precision == "float32"


def test_independent_features_need_no_second_pass() -> None:
    from accord.statistics.collect import near_dependent_spaces

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(256, 8)
    spec = trace(model, x[:2])
    data = CountedBatches((part,) for part in x.split(64))
    stats = collect_statistics([model, model], data, spec, progress=False)
    assert near_dependent_spaces(stats) == []
    assert data.drawn == [1, 1, 1, 1]  # one pass
