"""Model Stock, DELLA, Model Breadcrumbs, SCE and NuSLERP: each against values worked out by
hand from its formula on tiny tensors, end to end on tiny Llama checkpoints, and their config
errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from accord.combine.breadcrumbs import breadcrumbs, breadcrumbs_prune
from accord.combine.della import della, della_prune
from accord.combine.model_stock import model_stock
from accord.combine.nuslerp import nuslerp, nuslerp_t
from accord.combine.sce import sce
from accord.errors import ConfigError
from accord.llm import load_state_and_config
from accord.llm.config import validate_llm_merge_config
from accord.llm.merge import merge_checkpoints


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- Model Stock -----------------------------------------------------------------------------


def test_model_stock_two_models_by_hand() -> None:
    # τ1 = [1, 1, 0, 0], τ2 = [1, 0, 1, 0]: cos = 1 / (√2 √2) = 1/2, t = 2 · ½ / (1 + ½) = 2/3
    merged = model_stock([_t(1, 1, 0, 0), _t(1, 0, 1, 0)])
    torch.testing.assert_close(merged, _t(1, 0.5, 0.5, 0) * 2 / 3)
    # as the paper writes it: t · mean(θ_i) + (1 − t) θ_0, with θ_0 = 1
    base = torch.ones(4)
    fine_tuned = [base + _t(1, 1, 0, 0), base + _t(1, 0, 1, 0)]
    paper = 2 / 3 * (fine_tuned[0] + fine_tuned[1]) / 2 + 1 / 3 * base
    torch.testing.assert_close(base + merged, paper)


def test_model_stock_three_models_average_the_pairwise_cosines() -> None:
    # cos12 = 0, cos13 = cos23 = 1/√2: mean √2/3; t = 3c / (1 + 2c); mean τ = [2/3, 2/3]
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    merged = model_stock([_t(1, 0), _t(0, 1), _t(1, 1)])
    torch.testing.assert_close(merged, _t(2 / 3, 2 / 3) * t)


def test_model_stock_filter_wise_takes_one_ratio_per_row() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # rows: cos 0 (t = 0) and cos 1 (t = 2 / 2 = 1)
    torch.testing.assert_close(
        model_stock([a, b], filter_wise=True), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    )
    # whole tensor: cos = 2 / (√3 √3) = 2/3, t = (4/3) / (5/3) = 4/5
    torch.testing.assert_close(model_stock([a, b]), torch.tensor([[0.5, 0.5], [1.0, 1.0]]) * 0.8)


def test_model_stock_unchanged_tensor_keeps_the_base_and_one_model_is_refused() -> None:
    torch.testing.assert_close(model_stock([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 task vectors"):
        model_stock([torch.ones(3)])


# --- DELLA -----------------------------------------------------------------------------------


def test_della_keep_probabilities_follow_the_magnitude_ranks() -> None:
    # ranks (0 = smallest) [0, 3, 2, 1]: q = 0.2 + 0.6 r / 3 = [0.2, 0.8, 0.6, 0.4]
    delta = _t(0.1, -0.4, 0.3, 0.2)
    q = _t(0.2, 0.8, 0.6, 0.4)
    draws = torch.rand(1, 4, generator=torch.Generator().manual_seed(0)).reshape(4)
    expected = delta * (draws < q) / q
    pruned = della_prune(delta, 0.5, 0.3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pruned, expected)


def test_della_ranks_each_row_and_rows_of_one_keep_density() -> None:
    delta = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    q = torch.tensor([[0.25, 0.75], [0.75, 0.25]])  # density 0.5 ± 0.25 within each row
    draws = torch.rand(2, 2, generator=torch.Generator().manual_seed(4))
    pruned = della_prune(delta, 0.5, 0.25, torch.Generator().manual_seed(4))
    torch.testing.assert_close(pruned, delta * (draws < q) / q)
    column = torch.tensor([[1.0], [-2.0], [3.0]])
    draws = torch.rand(3, 1, generator=torch.Generator().manual_seed(4))
    pruned = della_prune(column, 0.4, 0.3, torch.Generator().manual_seed(4))
    torch.testing.assert_close(pruned, column * (draws < 0.4) / 0.4)


def test_della_pruning_is_unbiased_and_keeps_large_entries_more_often() -> None:
    delta = torch.linspace(-1, 1, 101)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([della_prune(delta, 0.5, 0.4, generator) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), delta, atol=0.08, rtol=0)
    kept = (draws != 0).float().mean(0)
    # the largest magnitudes (the ends) are kept with q ≈ 0.9, the smallest (middle) ≈ 0.1
    assert kept[0] > 0.85 and kept[-1] > 0.85 and kept[50] < 0.15


def test_della_rescalings() -> None:
    delta = _t(0.1, -0.4, 0.3, 0.2)
    draws = torch.rand(1, 4, generator=torch.Generator().manual_seed(0)).reshape(4)
    keep = draws < _t(0.2, 0.8, 0.6, 0.4)
    none = della_prune(delta, 0.5, 0.3, torch.Generator().manual_seed(0), "none")
    torch.testing.assert_close(none, delta * keep)
    l1 = della_prune(delta, 0.5, 0.3, torch.Generator().manual_seed(0), "l1")
    torch.testing.assert_close(l1, delta * keep * (1.0 / float((delta * keep).abs().sum())))


def test_della_merge_by_hand() -> None:
    # the draws of seed 0, in order: τ1's two, then τ2's two
    draws = torch.rand(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, _t(0.4963, 0.7682, 0.0885, 0.1320), atol=1e-4, rtol=0)
    deltas = [_t(2, -1), _t(-1, 3)]
    # density 0.5 ± 0.25: q1 = [0.75, 0.25], q2 = [0.25, 0.75]
    # kept: τ1 [yes, no] -> [2/0.75, 0]; τ2 [yes, yes] -> [-1/0.25, 3/0.75] = [-4, 4]

    def run(**options: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return della(deltas, density=0.5, epsilon=0.25, generator=generator, **options)

    torch.testing.assert_close(run(sign_election=False), _t(8 / 3 - 4, 4))  # della_linear
    # sums [-4/3, 4]: -, +; agreeing means -4 and 4
    torch.testing.assert_close(run(), _t(-4, 4))
    # weights [1, 0.5]: [8/3, 0] and [-2, 2]; sums [2/3, 2]: +, +; 8/3 over 1, 2 over 0.5
    torch.testing.assert_close(run(weights=[1.0, 0.5]), _t(8 / 3, 4))
    torch.testing.assert_close(run(weights=[1.0, 0.5], scale=0.5), _t(4 / 3, 2))


def test_della_density_one_drops_nothing_and_bad_epsilon_is_named() -> None:
    deltas = [_t(1, -2, 3), _t(-1, -1, 1)]
    generator = torch.Generator().manual_seed(0)
    # TIES at full density: signs [+, -, +]; means [1, -1.5, 2]
    torch.testing.assert_close(
        della(deltas, density=1.0, epsilon=0.5, generator=generator), _t(1, -1.5, 2)
    )
    with pytest.raises(ValueError, match=r"density=0.2 ± epsilon=0.2 .* choose epsilon < 0.2"):
        della_prune(_t(1, 2), 0.2, 0.2, generator)
    with pytest.raises(ValueError, match="rescale='l2'"):
        della_prune(_t(1, 2), 0.5, 0.1, generator, "l2")


# --- Model Breadcrumbs -----------------------------------------------------------------------

CRUMBS = _t(0.5, -4, 3, -1, 2, 0.1, -0.2, 6, 1.5, -0.05)


def test_breadcrumbs_drops_the_outliers_and_the_small_entries() -> None:
    # by magnitude: 6, -4, 3, 2, 1.5, -1, 0.5, -0.2, 0.1, -0.05; density 0.5 keeps 5 after
    # gamma 0.1 drops the largest one (6)
    torch.testing.assert_close(
        breadcrumbs_prune(CRUMBS, 0.5, 0.1), _t(0, -4, 3, -1, 2, 0, 0, 0, 1.5, 0)
    )
    # gamma 0.3 would leave 7 < 8 = ⌊0.8 · 10⌋: only the 2 largest go
    torch.testing.assert_close(
        breadcrumbs_prune(CRUMBS, 0.8, 0.3), _t(0.5, 0, 3, -1, 2, 0.1, -0.2, 0, 1.5, -0.05)
    )
    torch.testing.assert_close(breadcrumbs_prune(CRUMBS, 1.0, 0.1), CRUMBS)


def test_breadcrumbs_small_tensors_keep_their_largest_and_ties_go_by_position() -> None:
    # ⌊0.01 · 3⌋ = 0 outliers: the ⌊0.67 · 3⌋ = 2 largest remain (mergekit would zero it)
    torch.testing.assert_close(breadcrumbs_prune(_t(3, -1, 2), 0.67, 0.01), _t(3, 0, 2))
    # all tied: the first is the outlier, the next two are kept
    torch.testing.assert_close(breadcrumbs_prune(_t(1, 1, 1, 1), 0.5, 0.25), _t(0, 1, 1, 0))


def test_breadcrumbs_l1_rescale() -> None:
    # kept |.| sum 4 + 3 + 1 + 2 + 1.5 = 11.5; the whole task vector's 18.35
    kept = _t(0, -4, 3, -1, 2, 0, 0, 0, 1.5, 0)
    torch.testing.assert_close(breadcrumbs_prune(CRUMBS, 0.5, 0.1, "l1"), kept * 18.35 / 11.5)


def test_breadcrumbs_merge_by_hand() -> None:
    deltas = [_t(2, -2, 1, 0.5), _t(4, 2, -3, -0.1)]
    # density 0.5, gamma 0.25 (n = 4: 1 outlier, 2 kept): [0, -2, 1, 0] (the first 2 is the
    # outlier among the tied 2s) and [0, 2, -3, 0]
    torch.testing.assert_close(
        breadcrumbs(deltas, [1.0, 0.5], density=0.5, gamma=0.25, scale=2.0), _t(0, -2, -1, 0)
    )
    # with sign election: sums [0, 0, -2, 0] -> +, +, -, +; agreeing: none, 2, -3, none
    tied = breadcrumbs(deltas, density=0.5, gamma=0.25, sign_election=True)
    torch.testing.assert_close(tied, _t(0, 2, -3, 0))
    with pytest.raises(ValueError, match=r"gamma=1\.0"):
        breadcrumbs_prune(CRUMBS, 0.5, 1.0)


# --- SCE -------------------------------------------------------------------------------------


def test_sce_weights_by_squared_magnitude_and_erases_minority_signs() -> None:
    a, b = _t(1, 2, -3, 0.5), _t(3, -2, -1, 1.5)
    # ‖a‖² = 14.25, ‖b‖² = 16.25: w = [14.25, 16.25] / 30.5; sums [4, 0, -4, 2]: +, +, -, +
    # entry 1: only a (2) agrees; the others: both, Σ w τ / Σ w
    expected = _t(
        (14.25 * 1 + 16.25 * 3) / 30.5,
        2.0,
        (14.25 * -3 + 16.25 * -1) / 30.5,
        (14.25 * 0.5 + 16.25 * 1.5) / 30.5,
    )
    torch.testing.assert_close(sce([a, b]), expected)


def test_sce_selects_the_top_variance_positions() -> None:
    a, b = _t(1, 2, -3, 0.5), _t(3, -2, -1, 1.5)
    # variances ((a − b)/2)²: [1, 4, 1, 0.25]; ⌊0.5 · 4⌋ = 2: position 1, then position 0 (the
    # first of the tied 1s); then ‖â‖² = 5, ‖b̂‖² = 13; signs +, +; entry 1: only a agrees
    torch.testing.assert_close(sce([a, b], select_topk=0.5), _t((5 + 13 * 3) / 18, 2, 0, 0))
    # only nonzero variances count: 1 of 3, and ⌊0.5 · 1⌋ = 0 selects nothing
    torch.testing.assert_close(sce([_t(1, 5, 2), _t(1, 1, 2)], select_topk=0.5), torch.zeros(3))


def test_sce_zero_task_vectors_and_bad_select_topk() -> None:
    torch.testing.assert_close(sce([torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    with pytest.raises(ValueError, match="select_topk=0"):
        sce([torch.ones(2)], select_topk=0)


# --- NuSLERP ---------------------------------------------------------------------------------


def test_nuslerp_t_from_the_weights() -> None:
    assert nuslerp_t([1.0, 3.0]) == 0.75
    assert nuslerp_t([1.0, -1.0]) == 0.5  # weights summing to ~0: the midpoint, as mergekit
    with pytest.raises(ValueError, match="2 tensors, got 3"):
        nuslerp_t([1.0, 1.0, 1.0])


def test_nuslerp_whole_tensor_by_hand() -> None:
    # Ω = 90°, t = 0.75: sin(π/8) a + sin(3π/8) b
    result = nuslerp(_t(1, 0), _t(0, 2), 0.75)
    torch.testing.assert_close(result, _t(math.sin(math.pi / 8), 2 * math.sin(3 * math.pi / 8)))
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    # flattened: cos Ω = 1/3; at t = ½, sin(Ω/2)/sin Ω = 1 / (2 cos(Ω/2)), cos(Ω/2) = √(2/3)
    torch.testing.assert_close(nuslerp(a, b, 0.5), (a + b) / (2 * math.sqrt(2 / 3)))


def test_nuslerp_per_vector_along_the_last_or_the_first_axis() -> None:
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    s = math.sin(math.pi / 4)  # Ω = 90° at t = ½: sin 45° (a + b)
    # rows: [1, 1] ⟂ [1, -1]; [0, 1] ∥ [0, 1] (linear)
    rows = nuslerp(a, b, 0.5, flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[2 * s, 0.0], [0.0, 1.0]]))
    # columns: [1, 0] ∥ [1, 0] (linear); [1, 1] ⟂ [-1, 1]
    columns = nuslerp(a, b, 0.5, flatten=False, row_wise=True)
    torch.testing.assert_close(columns, torch.tensor([[1.0, 0.0], [0.0, 2 * s]]))


def test_nuslerp_interpolates_linearly_for_zero_and_opposite_vectors() -> None:
    torch.testing.assert_close(nuslerp(torch.zeros(2), _t(4, 8), 0.25), _t(1, 2))
    torch.testing.assert_close(nuslerp(_t(1, 0), _t(-1, 0), 0.5), _t(0, 0))


def test_new_methods_do_not_modify_their_inputs() -> None:
    deltas = [_t(1.0, -2.0, 0.5, 3.0), _t(-1.0, 3.0, 0.0, 2.0)]
    before = [d.clone() for d in deltas]
    model_stock(deltas)
    della(deltas, density=0.5, epsilon=0.2, generator=torch.Generator().manual_seed(0))
    breadcrumbs(deltas, density=0.5, gamma=0.25, rescale="l1")
    sce(deltas, select_topk=0.5)
    nuslerp(*deltas, 0.3)
    assert all(torch.equal(d, b) for d, b in zip(deltas, before, strict=True))


# --- end to end on tiny Llama checkpoints ----------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it (base plus small noise)."""
    pytest.importorskip("transformers")
    from accord.llm.testing import tiny_model

    root = tmp_path_factory.mktemp("llamas")
    base = tiny_model("llama", seed=0)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for seed in (1, 2, 3):
        model = tiny_model("llama", seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / f"ft{seed}")
        paths[f"ft{seed}"] = root / f"ft{seed}"
    return paths


CASES = {
    "model_stock": ({}, 3, True),
    "model_stock-filter_wise": ({"filter_wise": True}, 2, True),
    "della": ({"density": 0.5, "epsilon": 0.2}, 3, True),
    "della_linear": ({"density": 0.6, "epsilon": 0.1, "rescale": "l1"}, 2, True),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, 3, True),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.05, "rescale": "l1"}, 2, True),
    "sce": ({"select_topk": 0.5}, 3, True),
    "nuslerp": ({"nuslerp_flatten": False}, 2, True),
    "nuslerp-models": ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, False),
}


@pytest.mark.parametrize("case", CASES)
def test_each_method_merges_llamas_that_transformers_loads(
    case: str, llamas: dict[str, Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    parameters, n_models, with_base = CASES[case]
    method = case.split("-")[0]
    models = [llamas[f"ft{i}"] for i in range(1, n_models + 1)]
    base = llamas["base"] if with_base else None
    out = merge_checkpoints(
        models, tmp_path / "out", method=method, base=base, parameters=parameters, seed=7
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(8).reshape(1, 8)).logits
    assert torch.isfinite(logits).all()
    merged = load_state_and_config(out)[0]
    base_state = load_state_and_config(llamas["base"])[0]
    changed = [name for name in merged if not torch.equal(merged[name], base_state[name])]
    assert changed, f"{case}: the merge returned the base"
    if method in ("della", "della_linear"):  # seeded per tensor: a rerun draws the same
        again = load_state_and_config(
            merge_checkpoints(
                models, tmp_path / "again", method=method, base=base, parameters=parameters, seed=7
            )
        )[0]
        assert all(torch.equal(merged[name], again[name]) for name in merged)


def test_model_stock_on_llamas_matches_its_formula(llamas: dict[str, Path], tmp_path: Path) -> None:
    out = merge_checkpoints(
        [llamas["ft1"], llamas["ft2"]], tmp_path / "out", method="model_stock", base=llamas["base"]
    )
    name = "model.layers.0.mlp.up_proj.weight"
    base = load_state_and_config(llamas["base"])[0][name]
    a, b = (load_state_and_config(llamas[f"ft{i}"])[0][name] - base for i in (1, 2))
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    t = 2 * cos / (1 + cos)
    fine_tuned = [base + a, base + b]
    expected = t * (fine_tuned[0] + fine_tuned[1]) / 2 + (1 - t) * base
    torch.testing.assert_close(load_state_and_config(out)[0][name], expected)


# --- config errors ---------------------------------------------------------------------------


def _config(llamas: dict[str, Path], tmp_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "base": str(llamas["base"]),
        "models": [str(llamas["ft1"]), str(llamas["ft2"])],
        "output": str(tmp_path / "out"),
    } | data


def test_accord_yaml_reads_the_new_parameters(llamas: dict[str, Path], tmp_path: Path) -> None:
    data = _config(
        llamas,
        tmp_path,
        method="della",
        models=[{"path": str(llamas["ft1"]), "epsilon": 0.1}, str(llamas["ft2"])],
        parameters={"density": 0.5, "epsilon": [0.05, 0.2]},
    )
    config = validate_llm_merge_config(data)
    assert config.models[0].own_parameters() == {"epsilon": 0.1}
    validate_llm_merge_config(
        _config(llamas, tmp_path, method="nuslerp", base=None, parameters={"nuslerp_flatten": 0})
    )


@pytest.mark.parametrize(
    ("method", "parameters", "extra", "message"),
    [
        ("breadcrumbs", {"gamma": 1.5}, {}, "parameters.gamma=1.5: expected 0 <= gamma < 1"),
        ("della", {"epsilon": -0.1}, {}, "parameters.epsilon=-0.1: expected 0 <= epsilon < 1"),
        ("sce", {"select_topk": 0}, {}, "parameters.select_topk=0.0: expected 0 < select_topk"),
        ("sce", {"weight": 1}, {}, "parameters.weight: not used by method 'sce'"),
        ("model_stock", {"filter_wise": "rows"}, {}, "parameters.filter_wise"),
        ("model_stock", {}, {"models": ["ft1"]}, "model_stock needs at least 2 fine-tuned"),
        ("model_stock", {}, {"base": None}, "base: method 'model_stock' merges task vectors"),
        ("nuslerp", {}, {"models": ["ft1", "ft2", "ft3"]}, "nuslerp merges exactly 2 models"),
        ("nuslerp", {}, {"base": None, "receiver": "ft3"}, "to add to it without a base"),
        ("breadcrumbs", {"rescale": "expectation"}, {}, "expected one of none, l1"),
    ],
)
def test_config_errors_name_the_key(
    llamas: dict[str, Path],
    tmp_path: Path,
    method: str,
    parameters: dict[str, Any],
    extra: dict[str, Any],
    message: str,
) -> None:
    extra = {
        key: [str(llamas[m]) for m in value]
        if key == "models"
        else (str(llamas[value]) if isinstance(value, str) else value)
        for key, value in extra.items()
    }
    data = _config(llamas, tmp_path, method=method, parameters=parameters, **extra)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_llm_merge_config(data)


def test_della_window_outside_0_1_names_the_model_and_tensor_before_any_weight(
    llamas: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        ConfigError, match=r"models\[1\], tensor '.*': density=0.3 ± epsilon=0.4 .* choose"
    ):
        merge_checkpoints(
            [llamas["ft1"], llamas["ft2"]],
            tmp_path / "out",
            method="della",
            base=llamas["base"],
            parameters={"density": 0.3, "epsilon": 0.2},
            model_parameters=[{}, {"epsilon": 0.4}],
        )
    assert not (tmp_path / "out").exists()
