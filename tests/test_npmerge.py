"""NP Merge: learned parameter-wise coefficients (accord.combine.npmerge)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accord.combine.average import average_states
from accord.combine.npmerge import np_merge
from accord.errors import MergeError
from accord.figures import coefficient_histograms, loss_curve

Batch = tuple[torch.Tensor, torch.Tensor]


def np_merge_ce(*args, **kwargs):
    """np_merge with loss="ce" unless the test names a loss: its default, ce+kl, needs teachers."""
    kwargs.setdefault("loss", "ce")
    return np_merge(*args, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> Iterator[None]:
    yield


def mlp(seed: int, batchnorm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    norm: nn.Module = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(4, 16), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def toy_data(batches: int = 8, size: int = 32, seed: int = 0) -> list[Batch]:
    """Three classes decided by a fixed linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * size, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(1)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def states_of(*models: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def accuracy(state: dict[str, torch.Tensor], model: nn.Module, data: list[Batch]) -> float:
    model.load_state_dict(state)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("budget", [{"epochs": 0}, {"max_samples": 0}])
def test_zero_steps_is_the_plain_average_exactly(budget: dict[str, int]) -> None:
    states = states_of(mlp(0, batchnorm=True), mlp(1, batchnorm=True), mlp(2, batchnorm=True))
    result = np_merge_ce(mlp(9, batchnorm=True), states, toy_data(), progress=False, **budget)
    average = average_states(states)
    assert result.state.keys() == average.keys()
    for key, value in average.items():
        assert torch.equal(result.state[key], value), key
        assert result.state[key].dtype == value.dtype
    assert result.losses == [] and result.stages[0]["steps"] == 0


def test_training_lowers_the_loss_and_changes_nothing_else() -> None:
    template = mlp(9)
    before_template = states_of(template)[0]
    states = states_of(mlp(0), mlp(1))
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    result = np_merge_ce(template, states, toy_data(), epochs=3, lr=0.05, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert len(result.losses) == 24 and result.stages[0]["samples"] == 3 * 256
    for key, value in template.state_dict().items():
        assert torch.equal(value, before_template[key])
    for state, saved in zip(states, before, strict=True):
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert template.training  # the template's mode is untouched too
    assert not torch.equal(result.state["0.weight"], average_states(states)["0.weight"])


def test_first_step_is_adams_sign_step() -> None:
    """Adam's first step moves each logit by lr·sign(gradient): pin it from autograd on θ."""
    states = states_of(nn.Linear(4, 3), nn.Linear(4, 3))
    data = toy_data(batches=1)
    lr = 0.1
    average = average_states(states)
    theta = {k: v.clone().requires_grad_() for k, v in average.items()}
    x, y = data[0]
    F.cross_entropy(F.linear(x, theta["weight"], theta["bias"]), y).backward()
    for scheme, scale in (("joint", 2.0), ("pairwise", 1.0)):
        result = np_merge_ce(
            nn.Linear(4, 3), states, data, scheme=scheme, lr=lr, epochs=1, progress=False
        )
        for key in theta:
            # ∂L/∂a_0 ∝ g ⊙ (θ_0 − θ_1); joint logits move apart by 2·lr, a sigmoid's by lr
            slope = theta[key].grad * (states[0][key] - states[1][key])
            expected = torch.sigmoid(-scale * lr * slope.sign())
            clear = slope.abs() > 1e-4
            torch.testing.assert_close(
                result.coefficients[key][0][clear], expected[clear], rtol=0, atol=1e-4
            )


def test_coefficients_move_toward_the_correct_model() -> None:
    """Model 0 classifies perfectly, model 1 is random: NP Merge leans on model 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    w = torch.tensor([1.0, 0.5])
    good = {"weight": torch.stack([-w, w]) * 4, "bias": torch.zeros(2)}
    bad = {"weight": torch.randn(2, 2, generator=g) * 4, "bias": torch.randn(2, generator=g)}
    probe = nn.Linear(2, 2)
    plain = accuracy(average_states([good, bad]), probe, data)
    for scheme in ("joint", "pairwise"):
        result = np_merge_ce(
            nn.Linear(2, 2), [good, bad], data, epochs=5, lr=0.1, scheme=scheme, progress=False
        )
        assert result.coefficients["weight"][0].mean() > 0.6
        assert accuracy(result.state, probe, data) > max(plain + 0.05, 0.97)


def test_kl_to_the_ensemble_needs_no_labels() -> None:
    models = [mlp(0), mlp(1)]
    inputs = [x for x, _ in toy_data()]
    result = np_merge_ce(
        mlp(9), states_of(*models), inputs, loss="kl", teachers=models, epochs=2, progress=False
    )
    assert result.losses[-1] < result.losses[0]
    assert all(m.training for m in models)  # the teachers' modes are restored


def test_cross_entropy_without_labels_suggests_kl() -> None:
    inputs = [x for x, _ in toy_data()]
    with pytest.raises(MergeError, match="loss='kl'"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), inputs, progress=False)
    with pytest.raises(MergeError, match="kl"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), [(inputs[0], None)], progress=False)


def test_arguments_are_checked_together() -> None:
    with pytest.raises(MergeError) as error:
        np_merge_ce(mlp(9), states_of(mlp(0)), None, loss="cee", scheme="jiont", lr=0)
    message = str(error.value)
    for part in ("did you mean 'ce'", "did you mean 'joint'", "at least 2", "data=...", "lr=0"):
        assert part in message
    with pytest.raises(MergeError, match="teachers"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), loss="kl")
    with pytest.raises(MergeError, match="calibration set"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), [], progress=False)
    with pytest.raises(MergeError, match="calibration set"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), iter(toy_data()), epochs=2, progress=False)


def test_non_finite_states_are_refused_naming_the_tensor() -> None:
    states = states_of(mlp(0), mlp(1))
    states[1][next(iter(states[1]))].view(-1)[0] = float("inf")
    name = next(iter(states[1]))
    with pytest.raises(
        MergeError, match=rf"state 1: tensor {re.escape(repr(name))} has 1 inf among"
    ):
        np_merge_ce(mlp(9), states, toy_data(), epochs=0, progress=False)


@pytest.mark.parametrize("scheme", ["joint", "pairwise"])
def test_three_models_start_at_the_average(scheme: str) -> None:
    states = states_of(mlp(0), mlp(1), mlp(2))
    start = np_merge_ce(mlp(9), states, toy_data(), scheme=scheme, epochs=0, progress=False)
    for key, value in average_states(states).items():
        torch.testing.assert_close(start.state[key], value, rtol=0, atol=1e-6)
    result = np_merge_ce(mlp(9), states, toy_data(), scheme=scheme, lr=0.05, progress=False)
    assert len(result.stages) == (1 if scheme == "joint" else 2)
    assert result.stages[-1]["models"] == [0, 1, 2]
    for key, weights in result.coefficients.items():
        assert weights.shape == (3, *states[0][key].shape)
        torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
        merged = sum(w.double() * s[key].double() for w, s in zip(weights, states, strict=True))
        torch.testing.assert_close(result.state[key], merged.float(), rtol=1e-5, atol=1e-6)


def test_non_finite_batch_names_the_step() -> None:
    data = toy_data(batches=3)
    data[2] = (torch.full_like(data[2][0], math.nan), data[2][1])
    with pytest.raises(MergeError, match=r"step 3.*input batch has non-finite"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), data, progress=False)


def test_batchnorm_buffers_are_plain_averages() -> None:
    states = states_of(mlp(0, batchnorm=True), mlp(1, batchnorm=True))
    for i, state in enumerate(states):  # distinct running statistics
        state["1.running_mean"] += i + 1.0
        state["1.running_var"] *= 2.0 + i
        state["1.num_batches_tracked"] += 5 * (i + 1)
    result = np_merge_ce(mlp(9, batchnorm=True), states, toy_data(), epochs=2, progress=False)
    average = average_states(states)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(result.state[key], average[key]), key
    assert result.losses[-1] < result.losses[0]


def test_same_inputs_give_identical_outputs() -> None:
    states = states_of(mlp(0, dropout=0.3), mlp(1, dropout=0.3))
    runs = [
        np_merge_ce(mlp(9, dropout=0.3), states, toy_data(), seed=3, progress=False)
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(runs[0].state[k], runs[1].state[k]) for k in runs[0].state)


def test_memory_is_three_times_the_parameters_per_model() -> None:
    template = mlp(9)
    size = sum(p.numel() * p.element_size() for p in template.parameters())
    states = states_of(mlp(0), mlp(1), mlp(2))
    result = np_merge_ce(template, states, toy_data(batches=1), progress=False)
    assert result.memory_bytes["parameters"] == 3 * size
    assert result.memory_bytes["logits"] == 3 * size
    assert 2 * 3 * size <= result.memory_bytes["optimizer"] <= 2 * 3 * size + 64 * 4
    pairwise = np_merge_ce(template, states, toy_data(batches=1), scheme="pairwise", progress=False)
    assert pairwise.memory_bytes["logits"] == size


@pytest.mark.parametrize("scheme", ["joint", "pairwise"])
def test_channel_granularity_learns_one_coefficient_per_output_channel(scheme: str) -> None:
    """Models 0, 1, 2 hold 1, 2, 6 everywhere: the start is their average, 3, and the
    trained coefficients are constant along every axis but a weight's first."""
    template = mlp(9)
    states = [
        {k: torch.full_like(v, value) for k, v in template.state_dict().items()}
        for value in (1.0, 2.0, 6.0)
    ]
    start = np_merge_ce(
        template, states, toy_data(), scheme=scheme, epochs=0, progress=False, granularity="channel"
    )
    for value in start.state.values():
        torch.testing.assert_close(value, torch.full_like(value, 3.0), rtol=0, atol=1e-6)
    states = states_of(mlp(0), mlp(1), mlp(2))
    result = np_merge_ce(
        template, states, toy_data(), scheme=scheme, lr=0.05, progress=False, granularity="channel"
    )
    for key, weights in result.coefficients.items():
        assert weights.shape == (3, *states[0][key].shape)
        torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
        rows = weights.flatten(2) if weights.dim() > 2 else weights.unsqueeze(-1)
        torch.testing.assert_close(rows, rows[..., :1].expand_as(rows), rtol=0, atol=0)
    assert result.coefficients["0.weight"][0, :, 0].std() > 0  # rows learn apart
    # logits: one per row of the two weights (16 + 3) and per entry of the biases (16 + 3)
    per_model = 2 * (16 + 3) * 4
    assert result.memory_bytes["logits"] == (3 if scheme == "joint" else 1) * per_model


def test_unknown_granularity_is_refused() -> None:
    with pytest.raises(MergeError, match=r"granularity='row'.*parameter, channel"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), granularity="row")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(3, 3, bias=False)
        self.decode = nn.Linear(3, 3)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.relu(self.encode(x)))


def test_tied_parameters_stay_tied() -> None:
    torch.manual_seed(0)
    states = states_of(Tied(), Tied())
    x = torch.randn(64, 3)
    data = [(x, x.argmax(1))]
    result = np_merge_ce(Tied(), states, data, epochs=3, progress=False)
    assert set(result.coefficients) == {"encode.weight", "decode.bias"}
    assert torch.equal(result.state["decode.weight"], result.state["encode.weight"])


def test_figures_are_written(tmp_path) -> None:
    pair = np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), progress=False)
    result = np_merge_ce(mlp(9), states_of(mlp(0), mlp(1), mlp(2)), toy_data(), progress=False)
    many = {f"layer{i}.weight": result.coefficients["0.weight"] for i in range(30)}
    for name, coefficients in (("few", pair.coefficients), ("many", many)):
        coefficient_histograms(coefficients, tmp_path / f"{name}.png")
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    loss_curve(result.losses, tmp_path / "loss.png")
    assert matplotlib.image.imread(tmp_path / "loss.png").shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.png", "loss.png", "many.png"]


def test_early_stopping_keeps_the_best_pass_on_validation() -> None:
    """The kept state is the state after the best pass: a run stopped there gives it bit for
    bit; pass 0 is the plain average, measured as evaluation measures it."""
    states = states_of(mlp(0, dropout=0.3), mlp(1, dropout=0.3))
    train = toy_data(batches=2)
    # labels of another linear map: what training learns helps them only part of the way
    # (measured: 23 % at the start, 42 % after pass 2, 38 % after pass 6)
    held = toy_data(batches=4, seed=3)
    # a constant rate: under the cosine schedule the rate of a pass depends on the epochs
    fixed = {"lr": 0.2, "schedule": "constant", "progress": False}
    result = np_merge_ce(mlp(9, dropout=0.3), states, train, epochs=6, validation=held, **fixed)
    curve, kept = result.stages[0]["validation"], result.stages[0]["kept_pass"]
    assert len(curve) == 7 and curve[kept] == max(curve) and curve.index(max(curve)) == kept
    assert curve[0] == pytest.approx(accuracy(average_states(states), mlp(9, dropout=0.3), held))
    assert 0 < kept < 6  # neither end, so the test tells keeping from not keeping
    stopped = np_merge_ce(mlp(9, dropout=0.3), states, train, epochs=kept, **fixed)
    for key, value in stopped.state.items():
        assert torch.equal(result.state[key], value), key
    assert len(result.losses) == 6 * len(train)  # every pass trained; only the kept one stays


def recording_model(seen: list[torch.Tensor]) -> nn.Module:
    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return self.head(x.flatten(1))

    return Recording()


def test_crop_padding_trains_on_shifted_crops_of_each_batch() -> None:
    """Every image the model sees is its calibration image shifted by at most the padding,
    the uncovered border filled with the batch's smallest value; the shifts vary."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 6, 6, generator=g) + 1  # background 0 lies outside [1, 2)
    images[0, 0, 0, 0] = 0.5  # the batch minimum, the fill
    data = [(images, torch.randint(3, (8,), generator=g))]
    seen: list[torch.Tensor] = []
    states = states_of(recording_model([]), recording_model([]))
    np_merge_ce(recording_model(seen), states, data, crop_padding=2, epochs=3, progress=False)
    padded = F.pad(images, (2, 2, 2, 2), value=0.5)
    shifts = set()
    for batch in seen:
        for image, crop in zip(padded, batch, strict=True):
            found = [
                (dy, dx)
                for dy in range(5)
                for dx in range(5)
                if torch.equal(image[:, dy : dy + 6, dx : dx + 6], crop)
            ]
            assert found, "an input is no crop of its image"
            shifts.add(found[0])
    assert len(seen) == 3 and len(shifts) > 5


def test_crop_padding_needs_image_batches() -> None:
    with pytest.raises(MergeError, match=r"crop_padding needs image batches.*\(32, 4\)"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), crop_padding=2, progress=False)


def test_ce_plus_kl_weighs_kl_by_the_teachers_probability_of_the_label() -> None:
    """Per row, with p the teachers' probability of the label: (1 − p/2)·cross-entropy +
    p/2·(KL + the teachers' entropy), the mean of both losses where the teachers are sure."""
    models = [mlp(0), mlp(1)]
    states = states_of(*models)
    data = toy_data(batches=1)
    result = np_merge_ce(
        mlp(9), states, data, loss="ce+kl", teachers=models, epochs=1, progress=False
    )
    x, y = data[0]
    average = mlp(9)
    average.load_state_dict(average_states(states))
    with torch.no_grad():
        teacher = torch.stack([m(x) for m in models]).mean(0).log_softmax(-1)
        merged = average(x).log_softmax(-1)
    ce = F.nll_loss(merged, y, reduction="none")
    kl = (teacher.exp() * (teacher - merged)).sum(-1)
    entropy = -(teacher.exp() * teacher).sum(-1)
    p = teacher.exp().gather(1, y.unsqueeze(1)).squeeze(1)
    assert p.min() > 0.05 and p.max() < 0.95  # rows the teachers half trust
    expected = ((1 - p / 2) * ce + p / 2 * (kl + entropy)).mean()
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_ce_plus_kl_needs_teachers_and_labels() -> None:
    with pytest.raises(MergeError, match=r"loss='ce\+kl' needs the base models"):
        np_merge_ce(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), loss="ce+kl")
    models = [mlp(0), mlp(1)]
    inputs = [x for x, _ in toy_data()]
    with pytest.raises(MergeError, match=r"no labels, which loss='ce\+kl'"):
        np_merge_ce(mlp(9), states_of(*models), inputs, loss="ce+kl", teachers=models)


def test_the_default_loss_needs_teachers() -> None:
    with pytest.raises(MergeError, match=r"loss='ce\+kl' needs the base models as teachers"):
        np_merge(mlp(9), states_of(mlp(0), mlp(1)), toy_data(), progress=False)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_of_each_pass_follows_the_schedule(
    schedule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch a pass: step e + 1 runs at lr·(1 + cos(π·e/E))/2 (cosine) or at lr."""
    rates: list[float] = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    states = states_of(mlp(0), mlp(1))
    np_merge_ce(
        mlp(9), states, toy_data(batches=1), epochs=4, lr=0.1, schedule=schedule, progress=False
    )
    expected = [
        0.1 * (1 + math.cos(math.pi * e / 4)) / 2 if schedule == "cosine" else 0.1 for e in range(4)
    ]
    assert rates == pytest.approx(expected, rel=1e-12)
