"""Hugging Face model folders as accord models: read with ``from_pretrained`` from the local
folder (never the hub), wrapped as ``x -> model(x).logits``, written back as a folder that
``from_pretrained`` loads.

A folder holds ``config.json`` (whose ``architectures`` names the class, e.g.
``ViTForImageClassification``) and ``*.safetensors`` weights, as ``model.save_pretrained(folder)``
writes them. The class's ``main_input_name`` says what the model reads: ``pixel_values``
(images, N×C×H×W at the config's ``image_size`` and ``num_channels``) or ``input_ids`` (token
ids, N×L below the config's ``vocab_size``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accord.errors import ModelError

CONFIG = "config.json"
# Besides the tokenizer's files: what image and multimodal processors read.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
EXAMPLE_TOKENS = 8  # the length of the example token sequence for tracing
DEFAULT_IMAGE_SIZE = 224  # for configs without image_size (ResNet, ConvNeXt): their training size


class HFOutput(nn.Module):
    """``x -> getattr(model(x), output)``: the tensor accord aligns a Hugging Face model by
    (``logits``, or ``last_hidden_state`` for a model without a head)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.output)


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` describes a transformers model (has
    ``model_type`` or ``architectures``), as opposed to an accord checkpoint."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``; ModelError naming the file and the fix when it is missing,
    unreadable, names no architecture, or the folder has no safetensors weights."""
    path = folder / CONFIG
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder: give a Hugging Face model folder")
    if not path.is_file():
        raise ModelError(
            f"{folder} has no {CONFIG}: it is not a Hugging Face model folder; write one with "
            f"model.save_pretrained('{folder}')"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); save the model again") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:
        raise ModelError(
            f"{path} names no architecture (its 'architectures' list is missing or empty); "
            "save the model with save_pretrained from its task class, e.g. "
            'ViTForImageClassification, or add "architectures": ["<class name>"]'
        )
    if not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"{folder} has no *.safetensors weights (accord does not unpickle pytorch_model.bin); "
            f"save them with model.save_pretrained('{folder}', safe_serialization=True)"
        )
    return config


def model_class(config: dict[str, Any], folder: Path) -> type[nn.Module]:
    """The transformers class ``config["architectures"][0]``; ModelError naming it and the
    installed version when transformers does not know it."""
    try:
        import transformers
    except ImportError:
        raise ModelError(
            f"{folder} is a Hugging Face model folder, which needs transformers: "
            "pip install 'accord[llm]'"
        ) from None
    name = config["architectures"][0]
    found = getattr(transformers, str(name), None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ModelError(
            f"{folder / CONFIG}: architecture {name!r} is not a model class of transformers "
            f"{transformers.__version__}; upgrade transformers, or load the model in Python "
            "and pass it to accord.trace / accord.merge"
        )
    return found


def load_hf_model(folder: str | Path) -> tuple[HFOutput, dict[str, Any], torch.dtype]:
    """The model in ``folder`` wrapped as :class:`HFOutput` (float32, eval mode), its config
    and the dtype its weights were stored in. Weights the class does not expect, or expected
    weights the folder lacks, are a ModelError naming the first of them."""
    folder = Path(folder)
    config = read_hf_config(folder)
    cls = model_class(config, folder)
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(info.get(problem) or (), key=str)
        if keys:
            what = problem.replace("_keys", "").replace("_", " ")
            raise ModelError(
                f"{folder}: the weights do not match {cls.__name__} of its {CONFIG} ({what} "
                f"tensor {keys[0]!r}, {len(keys)} in all); the weights come from another "
                "architecture or configuration: save config and weights together with "
                "save_pretrained"
            )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model = model.float().eval()
    output = _output_name(model, hf_example_input(model, 1))
    return HFOutput(model, output).eval(), config, dtype


def _output_name(model: nn.Module, example: torch.Tensor) -> str:
    with torch.no_grad():
        outputs = model(example)
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(outputs, name, None), torch.Tensor):
            return name
    raise ModelError(
        f"{type(model).__name__} returns neither logits nor last_hidden_state; load it in "
        "Python and wrap it as a module that returns one tensor"
    )


def input_kind(model: nn.Module) -> str:
    """``"image"`` for a model reading ``pixel_values``, ``"tokens"`` for ``input_ids``."""
    name = getattr(model, "main_input_name", None)
    if name == "pixel_values":
        return "image"
    if name == "input_ids":
        return "tokens"
    raise ModelError(
        f"{type(model).__name__} reads {name!r}; accord reads Hugging Face models of images "
        "(pixel_values) and of text (input_ids)"
    )


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images ``model``'s config describes."""
    config = model.config
    size = getattr(config, "image_size", DEFAULT_IMAGE_SIZE)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return getattr(config, "num_channels", 3), height, width


def sequence_limit(model: nn.Module) -> int | None:
    """The longest token sequence ``model`` reads (its position embeddings), if it says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def hf_example_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input batch for ``model``: images of its config's size, or
    :data:`EXAMPLE_TOKENS` token ids below its vocabulary size."""
    generator = torch.Generator().manual_seed(seed)
    if input_kind(model) == "image":
        return torch.randn((batch, *image_shape(model)), generator=generator)
    length = min(EXAMPLE_TOKENS, sequence_limit(model) or EXAMPLE_TOKENS)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def write_hf_folder(
    wrapped: nn.Module, source: Path, folder: Path, dtype: torch.dtype = torch.float32
) -> None:
    """Write ``wrapped``'s Hugging Face model into the existing folder ``folder`` as
    ``save_pretrained`` does (``model.safetensors``, in ``dtype``), then copy ``source``'s
    ``config.json`` and its tokenizer and processor files, so that the folder loads like the
    source."""
    from accord.llm.io import TOKENIZER_FILES  # here: accord.llm is not needed to import accord

    model = wrapped.model if isinstance(wrapped, HFOutput) else wrapped
    model.to(device="cpu", dtype=dtype).save_pretrained(folder, safe_serialization=True)
    for name in (CONFIG, *TOKENIZER_FILES, *PROCESSOR_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
