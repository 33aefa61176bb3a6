"""`accord demo`: the main job on built-in defaults, in a few minutes on 2 CPU cores.

Trains (or reuses from the store) 4 small VGG11-BN models from different seeds on the
default dataset (Fashion-MNIST when installed, else scikit-learn's digits), then compares
the base models, their ensemble and every merge method in one table.
"""

from __future__ import annotations

import time

import accord
from accord._table import format_table

DEMO_MODELS = 4


def demo_request(dataset: str, data_dir: str | None = None) -> accord.ModelSetRequest:
    """The demo's model set: small enough to train in about a minute per model on 2 cores."""
    small = dataset == "digits"
    return accord.ModelSetRequest(
        arch="vgg11",
        dataset=dataset,
        seeds=tuple(range(DEMO_MODELS)),
        model={"width": 0.25 if small else 0.125, "batch_norm": True},
        train=accord.TrainConfig(epochs=30 if small else 5, lr=0.05, batch_size=128),
        limit=None if small else 15000,
        data_dir=data_dir,
    )


def run_demo(
    dataset: str = "auto",
    store: str = "models",
    *,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
) -> str:
    """Run the demo and return its report (a text table)."""
    start = time.perf_counter()
    name = accord.default_dataset() if dataset == "auto" else dataset
    request = demo_request(name, data_dir)
    checkpoints = accord.train_model_set(request, store, device=device, progress=progress)
    config = accord.MergeConfig(
        models=[str(c.path) for c in checkpoints],
        method="all",
        options="auto",
        samples=2000,
        device=device,
        data_dir=data_dir,
    )
    outcome = accord.run_merge(config, progress=progress)
    title = (
        f"accord demo: {DEMO_MODELS} x {request.arch} {request.model} on {name}, "
        "merged with every method (options chosen on the validation split)"
    )
    table = format_table(["model", "val acc", "test acc"], outcome.rows())
    return f"{title}\n{table}\n({time.perf_counter() - start:.0f} s)"
