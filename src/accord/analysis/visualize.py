"""What matched units encode: feature visualisation of the unit pairs a matching pairs
("Understanding Permutation Based Model Merging with Feature Visualizations", UniReps 2024).

Two models are aligned (:func:`accord.merge`, ``permutation`` or ``cca``, model A the
reference). In a feature space, unit ``c`` of each model in the merged coordinates is a linear
combination of its observed features, row ``c`` of its alignment map ``T`` (a single feature
for a permutation; for CCA the aligned combination); the merged model's unit ``c`` is its own
feature ``c``. Each unit's activation on an input is averaged over spatial positions / tokens.
A pair's correlation is the Pearson correlation of A's and B's unit ``c`` over the inputs. For
the ``k`` best- and worst-correlated pairs, each of A, B and the merged model is shown by

* its top-activating inputs of the dataset (largest activation first, ties by index), and
* an activation-maximisation image: gradient ascent (Adam) on the input for the unit's
  activation, the image parametrised in a decorrelated basis (Fourier coefficients scaled by
  1/frequency, colours through the square root of the data's channel covariance, a sigmoid
  onto the data's range), with a light Gaussian blur and a random jitter of the input at
  every step (Olah et al., 2017, "Feature Visualization"); the start is redrawn (up to
  :data:`RESTARTS` times) while the unit does not respond to it, as a unit behind a ReLU gives
  no gradient where it is off.

Per space, the *agreement* is the mean over units and both parents of the share of the merged
unit's top inputs that are among the parent's unit's top inputs: 1 when merging changed no
unit's preferred inputs. A unit constant over the inputs (a ReLU that never fires) has no top
inputs, only ties: it is left out of the agreement, the best and worst pairs are chosen among
pairs live in both parents, and the grid names the models in which a shown unit is constant.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accord._io import write_json, write_with
from accord._table import format_table
from accord.checkpoint import load_checkpoint
from accord.data import Dataset, load_dataset, make_loader
from accord.errors import ConfigError
from accord.merge import merge
from accord.registry import ALIGNMENTS
from accord.spec import FeatureSpace, Spec
from accord.store import checkpoint_dataset
from accord.trace.observe import ObservedModel, observed_model

ROLES = ("A", "B", "merged")
RESTARTS = 16  # random starting images tried until the unit responds to one


@dataclass(frozen=True)
class UnitProbe:
    """How to read one space's units from a model: the observation node, its feature axis,
    and the map whose rows are the units (features → merged coordinates)."""

    node: str
    axis: int
    matrix: Tensor  # C × C, float64
    # the graph the node belongs to (Spec.graph, Spec.leaf_modules)
    graph: str = "export"
    leaf_modules: tuple[str, ...] = ()

    def observed(self, model: nn.Module, example: Tensor) -> ObservedModel:
        """``model`` returning ``(output, {node: features})``; ``example`` is an input
        batch torch.export runs the model on."""
        return observed_model(
            model, [self.node], example, graph=self.graph, leaf_modules=self.leaf_modules
        )


def _probe(spec: Spec, space: FeatureSpace, matrix: Tensor) -> UnitProbe:
    if not space.observe:
        raise ConfigError(f"space {space.name!r} has no observation point to read units from")
    point = space.observe[0]
    if point.picks_rows:
        raise ConfigError(
            f"space {space.name!r} is observed on the tokens routed to one expert "
            "(Observation.rows), not one activation per input: its units cannot be read so"
        )
    matrix = matrix.to(torch.float64)
    return UnitProbe(point.node, point.axis, matrix, spec.graph, spec.leaf_modules)


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters are: torch.export runs it on an input there."""
    return next(model.parameters(), torch.empty(0)).device


def _pooled(observed: Tensor, axis: int) -> Tensor:
    """``(batch, C)``: the features on ``axis``, every other non-batch axis averaged."""
    moved = observed.movedim(axis, -1)
    return moved.reshape(len(moved), -1, moved.shape[-1]).mean(1)


@torch.no_grad()
def unit_activations(
    model: nn.Module, probe: UnitProbe, data: Dataset, device: str = "cpu"
) -> Tensor:
    """``(n, C)`` float64: every input's activation of every unit (rows of the probe's map)."""
    graph = probe.observed(model, data.images[:2].to(_device(model))).to(device).eval()
    rows = []
    for inputs, _ in make_loader(data, batch_size=512):
        _, observed = graph(inputs.to(device))
        rows.append(_pooled(observed[probe.node], probe.axis).double().cpu())
    return torch.cat(rows) @ probe.matrix.T


def top_examples(activations: Tensor, count: int) -> Tensor:
    """``(C, count)``: per unit (column of ``activations``, n × C), the indices of its
    ``count`` largest activations, largest first, equal values by index."""
    order = torch.sort(activations.T, dim=1, descending=True, stable=True).indices
    return order[:, :count]


def pair_correlations(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of column ``c`` of ``a`` with column ``c`` of ``b`` (0 where
    either is constant)."""
    a, b = a - a.mean(0), b - b.mean(0)
    scale = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(scale > 0, (a * b).sum(0) / scale.clamp_min(1e-300), 0.0)


def live_units(activations: Tensor, tol: float = 1e-9) -> Tensor:
    """The units (columns of ``activations``, n × C) that vary over the inputs: a unit that
    never fires has no top inputs, only ties."""
    spread = activations.std(0) if len(activations) > 1 else torch.zeros(activations.shape[1])
    return spread > tol * spread.max().clamp_min(1e-300)


def agreement(
    merged: Tensor, parents: Sequence[Tensor], live: Sequence[Tensor] | None = None
) -> float | None:
    """The mean over units and parents of the share of the merged unit's top inputs (rows of
    ``merged``, C × m) that are among the parent's (C × m); with ``live`` (one boolean mask
    per parent), over the units live in the merged model and that parent only. None when no
    unit counts."""
    shares = []
    for p, parent in enumerate(parents):
        for unit, (mine, theirs) in enumerate(zip(merged.tolist(), parent.tolist(), strict=True)):
            if live is None or bool(live[p][unit]):
                shares.append(len(set(mine) & set(theirs)) / len(mine))
    return float(np.mean(shares)) if shares else None


@dataclass(frozen=True)
class ImagePrior:
    """The data's range and colour covariance, for the parametrisation of synthetic inputs."""

    low: Tensor  # (C, 1, 1)
    high: Tensor  # (C, 1, 1)
    colour: Tensor  # C × C, the square root of the channels' correlation

    @classmethod
    def of(cls, data: Dataset) -> ImagePrior:
        images = data.images.double()
        channels = images.transpose(0, 1).reshape(images.shape[1], -1)
        low, high = channels.min(1).values, channels.max(1).values
        correlation = torch.corrcoef(channels) if len(channels) > 1 else torch.ones(1, 1)
        values, vectors = torch.linalg.eigh(torch.atleast_2d(correlation))
        root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
        shape = (-1, 1, 1)
        return cls(low.float().reshape(shape), high.float().reshape(shape), root.float())


def _blur(image: Tensor, sigma: float = 0.5) -> Tensor:
    """A 3 × 3 Gaussian blur of each channel of ``image`` (C × H × W), edges reflected."""
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma**2))
    kernel = (torch.outer(taps, taps) / taps.sum() ** 2).to(image.device)
    channels = image.shape[0]
    padded = F.pad(image[None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels)[0]


def activation_maximisation(
    model: nn.Module,
    probe: UnitProbe,
    unit: int,
    shape: tuple[int, int, int],
    prior: ImagePrior,
    *,
    steps: int = 256,
    lr: float = 0.05,
    jitter: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> Tensor:
    """An input (C × H × W) that maximises ``unit`` (row ``unit`` of the probe's map), by
    gradient ascent in the decorrelated parametrisation of the module docstring."""
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    scale = 1.0 / torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / max(height, width))
    scale = (scale / scale.square().mean().sqrt()).to(device)  # unit-variance pixels
    example = torch.zeros(2, *shape, device=_device(model))
    graph = probe.observed(model, example).to(device).eval()
    weights = probe.matrix[unit].float().to(device)
    colour, low, high = (t.to(device) for t in (prior.colour, prior.low, prior.high))

    def image(spectrum: Tensor) -> Tensor:
        coefficients = torch.view_as_complex(spectrum) * scale
        x = torch.fft.irfft2(coefficients, s=(height, width), norm="ortho")
        x = torch.einsum("cd,dhw->chw", colour, x)
        return low + (high - low) * torch.sigmoid(x)

    def gradient(spectrum: Tensor) -> Tensor:
        shift = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(_blur(image(spectrum)), shifts=shift, dims=(1, 2))
        _, observed = graph(x[None])
        objective = _pooled(observed[probe.node], probe.axis)[0] @ weights
        return torch.autograd.grad(-objective, spectrum)[0]

    # A unit behind a ReLU that is off for the first draw has no gradient there: draw again.
    for _ in range(RESTARTS):
        spectrum = torch.randn(channels, height, width // 2 + 1, 2, generator=generator)
        spectrum = spectrum.mul_(0.5).to(device).requires_grad_(True)
        if gradient(spectrum).abs().max() > 0:
            break
    optimizer = torch.optim.Adam([spectrum], lr=lr)
    for _ in range(steps):
        spectrum.grad = gradient(spectrum)
        optimizer.step()
    return image(spectrum).detach().cpu()


@dataclass
class SpaceVisual:
    """One space's matched units: every pair's correlation, the units shown (``k`` best,
    then ``k`` worst), each role's top inputs for every unit and act-max images of those
    shown, the agreement score (None when no unit is live) and each role's live units."""

    space: str
    method: str
    correlations: Tensor
    units: list[int]
    top: dict[str, Tensor]
    images: dict[str, list[Tensor]]
    agreement: float | None
    live: dict[str, Tensor]

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "agreement": self.agreement,
            "mean_correlation": float(self.correlations.mean()),
            "dead_units": {role: int((~self.live[role]).sum()) for role in ROLES},
            "units": [
                {
                    "unit": unit,
                    "correlation": float(self.correlations[unit]),
                    "top": {role: self.top[role][unit].tolist() for role in ROLES},
                }
                for unit in self.units
            ],
        }


def _spaces(spec: Spec, transforms: dict[str, Any], names: Sequence[str] | None) -> list[str]:
    """The spaces to show: those named, else every aligned space read one row per input (an
    expert's, observed on the tokens routed to it, is not)."""
    aligned = [s for s in spec.spaces if s.name in transforms and s.observe]
    available = [s.name for s in aligned if not any(p.picks_rows for p in s.observe)]
    if not names:
        return available
    experts = [n for n in names if n in {s.name for s in aligned} and n not in available]
    if experts:
        raise ConfigError(
            f"space(s) {experts} are observed on the tokens routed to one expert "
            "(Observation.rows), not one activation per input, so their units have no top "
            f"inputs; choose from {available}"
        )
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(
            f"space(s) {unknown} are not aligned spaces of these models; choose from {available}"
        )
    return list(names)


def visualize_models(
    model_a: nn.Module,
    model_b: nn.Module,
    train: Dataset,
    examples: Dataset,
    *,
    spaces: Sequence[str] | None = None,
    method: str = "permutation",
    k: int = 3,
    top: int = 6,
    steps: int = 256,
    device: str = "cpu",
) -> list[SpaceVisual]:
    """Align and merge ``model_b`` onto ``model_a`` by ``method`` (statistics on ``train``),
    then, per space (default: every aligned space), the units of the module docstring with
    their ``top`` top inputs from ``examples`` and act-max images (``steps`` steps)."""
    if k < 1 or top < 1:
        raise ConfigError(f"k={k}, top={top}: show at least one pair and one input")
    result = merge([model_a, model_b], make_loader(train, batch_size=256), method, device=device)
    models = {"A": model_a, "B": model_b, "merged": result.model}
    prior = ImagePrior.of(examples)
    visuals = []
    for name in _spaces(result.spec, result.transforms[1], spaces):
        space = result.spec[name]
        probes = {
            "A": _probe(result.spec, space, result.transforms[0][name].matrix),
            "B": _probe(result.spec, space, result.transforms[1][name].matrix),
            "merged": _probe(result.spec, space, torch.eye(space.size, dtype=torch.float64)),
        }
        acts = {r: unit_activations(models[r], probes[r], examples, device) for r in ROLES}
        visual = _space_visual(name, method, acts, k, min(top, len(examples)))
        shape = tuple(examples.images.shape[1:])
        for role in ROLES:
            visual.images[role] = [
                activation_maximisation(
                    models[role].cpu(), probes[role], u, shape, prior, steps=steps
                )
                for u in visual.units
            ]
        visuals.append(visual)
    return visuals


def _space_visual(name: str, method: str, acts: dict[str, Tensor], k: int, top: int) -> SpaceVisual:
    """Correlations, the units to show (best and worst among pairs live in both parents; all
    pairs when none is), top inputs and the agreement of one space (no images yet)."""
    live = {r: live_units(acts[r]) for r in ROLES}
    correlations = pair_correlations(acts["A"], acts["B"])
    order = torch.sort(correlations, descending=True, stable=True).indices.tolist()
    both = [u for u in order if live["A"][u] and live["B"][u]] or order
    shown = max(1, min(k, len(both) // 2))
    units = list(dict.fromkeys(both[:shown] + both[-shown:]))
    tops = {r: top_examples(acts[r], top) for r in ROLES}
    masks = [live["merged"] & live[p] for p in ("A", "B")]
    score = agreement(tops["merged"], [tops["A"], tops["B"]], masks)
    return SpaceVisual(name, method, correlations, units, tops, {}, score, live)


def grid_image(tiles: Sequence[Sequence[Tensor | None]], pad: int = 1) -> np.ndarray:
    """Tiles (C × H × W, values in [0, 1], C = 1 or 3; None: left blank) laid out row by row
    on a white ``(rows·(H+pad)+pad, cols·(W+pad)+pad, 3)`` array."""
    first = next(t for row in tiles for t in row if t is not None)
    height, width = first.shape[1:]
    columns = max(len(row) for row in tiles)
    grid = np.ones((len(tiles) * (height + pad) + pad, columns * (width + pad) + pad, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            pixels = tile.detach().float().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0)
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = pixels.numpy()
    return grid


def _tiles(visual: SpaceVisual, examples: Dataset, prior: ImagePrior) -> list[list[Any]]:
    """One row per shown unit: per role its top inputs, then its act-max image, then a gap."""

    def unit_range(image: Tensor) -> Tensor:
        return (image - prior.low) / (prior.high - prior.low).clamp_min(1e-12)

    rows = []
    for i, unit in enumerate(visual.units):
        row: list[Tensor | None] = []
        for role in ROLES:
            row += [unit_range(examples.images[j]) for j in visual.top[role][unit].tolist()]
            row += [unit_range(visual.images[role][i]), None]
        rows.append(row[:-1])
    return rows


def plot_space(visual: SpaceVisual, examples: Dataset, path: str | os.PathLike[str]) -> None:
    """The space's grid as a PNG: rows are the shown unit pairs (best first), column groups
    A, B and merged, each its top inputs and then its act-max image."""
    from matplotlib.figure import Figure

    prior = ImagePrior.of(examples)
    grid = grid_image(_tiles(visual, examples, prior))
    height, width = examples.images.shape[2:]
    per_role = visual.top["A"].shape[1] + 1
    figure = Figure(figsize=(2 + grid.shape[1] / 18, 1 + grid.shape[0] / 18), layout="constrained")
    ax = figure.subplots()
    ax.imshow(grid, interpolation="nearest")
    shown = len(visual.units) // 2 if len(visual.units) > 1 else 1
    labels = []
    for i, unit in enumerate(visual.units):
        dead = [r for r in ROLES if not visual.live[r][unit]]
        note = f" (constant in {', '.join(dead)})" if dead else ""
        correlation = float(visual.correlations[unit])
        labels.append(f"{'best' if i < shown else 'worst'}: unit {unit}, r {correlation:.2f}{note}")
    ax.set_yticks([1 + (height + 1) * (i + 0.5) for i in range(len(labels))], labels, fontsize=7)
    centres = [1 + (width + 1) * (g * (per_role + 1) + per_role / 2) for g in range(len(ROLES))]
    names = [f"{r}: top inputs | act-max" for r in ("model A", "model B", "merged")]
    ax.set_xticks(centres, names, fontsize=7)
    ax.xaxis.tick_top()
    score = "-" if visual.agreement is None else f"{visual.agreement:.2f}"
    dead = ", ".join(f"{r} {int((~visual.live[r]).sum())}" for r in ROLES)
    ax.set_title(
        f"{visual.space} ({visual.method}): agreement of merged top inputs with parents' "
        f"{score}; constant units: {dead}",
        fontsize=8,
    )
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def write_visuals(
    visuals: Sequence[SpaceVisual], examples: Dataset, out: str | os.PathLike[str]
) -> list[Path]:
    """One PNG per space (``<space>.png``, characters other than letters, digits, ``.``, ``_``
    and ``-`` replaced by ``_``) and ``visualize.json`` under ``out``."""
    root = Path(out)
    paths = []
    for visual in visuals:
        path = root / f"{re.sub(r'[^A-Za-z0-9._-]', '_', visual.space)}.png"
        plot_space(visual, examples, path)
        paths.append(path)
    write_json(root / "visualize.json", {v.space: v.summary() for v in visuals})
    return [*paths, root / "visualize.json"]


def add_visualize_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``accord visualize MODEL_A MODEL_B`` to the ``accord`` subparsers ``sub``."""
    p = sub.add_parser(
        "visualize",
        help="top inputs and act-max images of the best- and worst-matched units of a space",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("model_a", help="checkpoint folder (the reference)")
    p.add_argument("model_b", help="checkpoint folder")
    p.add_argument("--space", action="append", default=None, help="space name (repeatable)")
    p.add_argument(
        "--method",
        default="permutation",
        help=f"the alignment ({', '.join(sorted(ALIGNMENTS))}) [%(default)s]",
    )
    p.add_argument("--k", type=int, default=3, help="best and worst pairs shown [%(default)s]")
    p.add_argument("--top", type=int, default=6, help="top inputs per unit [%(default)s]")
    p.add_argument("--steps", type=int, default=256, help="act-max steps [%(default)s]")
    p.add_argument(
        "--split",
        choices=("val", "test", "train"),
        default="val",
        help="the split whose top-activating inputs are shown [%(default)s]",
    )
    p.add_argument("--data", default=None, help="dataset name (default: the checkpoints' own)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--out", default="visualize", help="output folder [%(default)s]")
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=_cmd_visualize)
    return p


def _cmd_visualize(args: argparse.Namespace) -> int:
    checkpoints = [load_checkpoint(p, args.device) for p in (args.model_a, args.model_b)]
    if args.data is None:
        data = checkpoint_dataset(checkpoints, args.data_dir)
    else:
        data = load_dataset(args.data, args.data_dir)
    examples = getattr(data, args.split)
    visuals = visualize_models(
        checkpoints[0].model,
        checkpoints[1].model,
        data.train,
        examples,
        spaces=args.space,
        method=args.method,
        k=args.k,
        top=args.top,
        steps=args.steps,
        device=args.device,
    )
    paths = write_visuals(visuals, examples, args.out)
    rows = [
        [v.space, float(v.correlations.mean()), "-" if v.agreement is None else v.agreement]
        for v in visuals
    ]
    print(format_table(["space", "mean pair correlation", "top-input agreement"], rows))
    print(f"written to {args.out}: {', '.join(p.name for p in paths)}")
    return 0
