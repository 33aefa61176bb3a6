"""``accord merge`` of models users bring: Hugging Face folders, or weights of their own class.

Loads the models (:func:`accord.models.load_user_model`), draws the statistics data
(:mod:`accord.models.inputs`), traces the first model, merges with one method or all, and
reports each model's and each merge's top-1 agreement with the base models' logit-averaging
ensemble on that data (these models come without a labelled validation split). With an output
folder, each merge is written the way its inputs came: a folder ``from_pretrained`` loads
(config.json and tokenizer or processor files copied from the first model), or
``model.safetensors`` with ``model.json`` (the class and its arguments); ``report.json`` beside
it; the whole output appears in one rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from accord._io import write_json
from accord._outputs import check_output, write_folder
from accord.config import MergeConfig
from accord.errors import ConfigError, ModelError
from accord.merge import MergeResult, check_base, check_models
from accord.models import UserModel, is_hf_folder, load_user_model
from accord.models.hf import write_hf_folder
from accord.models.inputs import Batch, calibration_batches
from accord.registry import MethodPlan
from accord.trace import trace
from accord.trace.programs import shared_exports
from accord.workflow import MERGE_OUTPUT, merge_each, merge_inputs, merge_requests

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"  # the class and arguments that rebuild a merged --model


@dataclass
class UserMethodOutcome:
    """One merged model, its top-1 agreement with the base models' ensemble and its time."""

    method: str
    result: MergeResult
    agreement: float
    seconds: float


@dataclass
class UserMergeOutcome:
    """The loaded models, their agreement with their ensemble, and every merge's."""

    models: list[UserModel]
    agreement: list[float]
    methods: list[UserMethodOutcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # comparison methods that need labels

    def rows(self) -> list[list[Any]]:
        """Table rows: name, top-1 agreement with the ensemble."""
        rows: list[list[Any]] = [[f"base model {i}", a] for i, a in enumerate(self.agreement)]
        rows += [[f"merge: {m.method}", m.agreement] for m in self.methods]
        rows += [
            [f"merge: {name}", "skipped: needs labels, the data has none"] for name in self.skipped
        ]
        return rows


@shared_exports()  # one export of the architecture for the trace and every method's merge
def run_user_merge(config: MergeConfig, progress: bool = True) -> UserMergeOutcome:
    """Merge the models ``config.models`` names (Hugging Face folders, or weights files of
    ``config.model``, traced on random inputs of ``config.input_shape`` when given, else on the
    data's first batch) on ``config.data``; write them when ``config.output`` is set."""
    requests = merge_requests(config)
    _check_config(config)
    if config.output:  # a bad output folder fails now, not after the merge
        check_output(
            config.output, MERGE_OUTPUT, overwrite=config.overwrite, inputs=merge_inputs(config)
        )
    shape = config.input_shape
    users = [load_user_model(p, config.model, config.model_args, shape) for p in config.models]
    kinds = {(u.kind, type(u.module)) for u in users}
    if len(kinds) > 1:
        raise ModelError(
            f"{config.models}: the models are of different kinds or classes; merge models of "
            "one architecture"
        )
    modules = [u.module for u in users]
    check_models(modules, config.models)
    base = None
    if config.base is not None:
        base = load_user_model(config.base, config.model, config.model_args).module
        check_base(base, modules, f"the base ({config.base})", config.models)
    data = calibration_batches(
        config.data,
        users[0],
        config.samples,
        config.batch_size,
        config.sequence_length,
        config.data_dir,
    )
    example = users[0].example if users[0].example is not None else data[0][0][:2]
    skipped: list[str] = []
    if config.method == "all" and len(data[0]) == 1:
        skipped = [plan.name for _, plan in requests if _needs_labels(plan)]
        requests = [(request, plan) for request, plan in requests if not _needs_labels(plan)]
    spec = trace(modules[0], example)
    ensemble = _ensemble_predictions(modules, data)
    agreement = [_agreement(m, data, ensemble) for m in modules]
    outcome = UserMergeOutcome(users, agreement, skipped=skipped)
    merges = merge_each(modules, data, requests, spec, config.reference, config, progress, base)
    for plan, result, seconds in merges:
        agreement = _agreement(result.model.eval(), data, ensemble)
        outcome.methods.append(UserMethodOutcome(plan.name, result, agreement, seconds))
    if config.output:
        _write(outcome, config)
    return outcome


def _needs_labels(plan: MethodPlan) -> bool:
    return plan.align.needs.labels or plan.combine.needs.labels


def _check_config(config: MergeConfig) -> None:
    if config.reference == "best" or config.options == "auto":
        raise ConfigError(
            "reference best and options auto choose on a labelled validation split, which "
            "Hugging Face folders and --model do not come with; give --reference INDEX and "
            "the method's --option values"
        )
    if config.model is None and config.model_args:
        raise ConfigError("model_args (--model-args) is given without model (--model CLASS)")
    if config.model is None and config.input_shape is not None:
        raise ConfigError(
            "input_shape (--input-shape) is for --model: a Hugging Face folder's example input "
            "comes from its config.json"
        )
    if config.model is None:
        others = [p for p in config.models if not is_hf_folder(p)]
        if others:
            raise ConfigError(
                f"{others[0]} is not a Hugging Face model folder, unlike the other models: "
                "merge folders of one kind (accord checkpoints apart, with their own run)"
            )
        if config.base is not None and not is_hf_folder(config.base):
            raise ConfigError(
                f"base {config.base} is not a Hugging Face model folder, unlike the models: "
                "give the folder they were fine-tuned from"
            )
    elif config.base is not None and Path(config.base).is_dir():
        raise ConfigError(
            f"base {config.base} is a folder, but the models are weights files of --model "
            f"{config.model}: give the base's weights file (.safetensors, .pt)"
        )


def _ensemble_predictions(models: list[nn.Module], data: list[Batch]) -> list[torch.Tensor]:
    """Per batch, the top-1 class of the models' averaged outputs (over the last axis)."""
    with torch.no_grad():
        return [
            torch.stack([_outputs(m, batch).cpu() for m in models]).mean(dim=0).argmax(dim=-1)
            for batch in data
        ]


def _outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``model``'s outputs on ``batch``, computed on the model's device."""
    device = next(model.parameters()).device
    return model(batch[0].to(device))


def _agreement(model: nn.Module, data: list[Batch], ensemble: list[torch.Tensor]) -> float:
    """The share of positions where ``model``'s top-1 class is the ensemble's."""
    same = total = 0
    with torch.no_grad():
        for batch, expected in zip(data, ensemble, strict=True):
            got = _outputs(model, batch).argmax(dim=-1).cpu()
            same += int((got == expected).sum())
            total += expected.numel()
    return same / total


def _write(outcome: UserMergeOutcome, config: MergeConfig) -> None:
    if not config.output:
        raise ConfigError("output: no folder given, so there is nowhere to write the merge")
    first = outcome.models[0]

    def fill(root: Path) -> None:
        several = len(outcome.methods) > 1
        for method in outcome.methods:
            folder = root / method.method if several else root
            folder.mkdir(exist_ok=True)
            _write_model(method.result.model, first, folder)
            report = dict(method.result.report)
            report["agreement_with_ensemble"] = {
                "merged": method.agreement,
                "base": outcome.agreement,
            }
            report["models"] = list(config.models)
            report["config"] = config.model_dump()
            report["seconds"] = method.seconds
            write_json(folder / "report.json", report)

    write_folder(
        config.output, MERGE_OUTPUT, fill, overwrite=config.overwrite, inputs=merge_inputs(config)
    )


def _write_model(model: nn.Module, first: UserModel, folder: Path) -> None:
    if first.kind == "hf":
        write_hf_folder(model, first.source, folder, first.dtype)
        return
    # clones: tied parameters share memory, which safetensors refuses to write
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    write_json(folder / MODEL_JSON, {"model": first.model, "model_args": first.model_args})
