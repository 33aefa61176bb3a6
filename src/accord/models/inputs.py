"""Data for the statistics pass of models users bring (``accord merge --data``), offline.

- Image models (Hugging Face ``pixel_values``): a dataset name (:data:`accord.DATASETS`; the
  default, as for ``accord train``, is Fashion-MNIST when installed, else digits), its training
  images resized (bilinear) to the config's ``image_size`` and repeated (grey to colour) or
  averaged (colour to grey) to its ``num_channels``.
- Text models (``input_ids``): a ``.txt`` file, tokenized with the folder's own tokenizer and
  cut into sequences of ``sequence_length`` tokens (default :data:`SEQUENCE_LENGTH`, or the
  model's positions when fewer); a ``.json`` file of token ids (a list of
  ids, or a list of lists, concatenated and cut the same way); or ``random-tokens``, uniform
  random ids, **a smoke test only**: their statistics describe no text, so a merge aligned on
  them says nothing about the models' quality.
- A user's own class: a dataset name, its images as they are (the class reads them), or, given
  ``--input-shape``, fitted to it (:func:`fit_input`); in the dtype of the class's weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accord.data import DATASETS, default_dataset, load_dataset
from accord.errors import DataError
from accord.models import UserModel
from accord.models.hf import image_shape, sequence_limit

RANDOM_TOKENS = "random-tokens"
SEQUENCE_LENGTH = 32  # tokens per sequence unless given, or the model's positions when fewer
Batch = tuple[torch.Tensor, ...]


def calibration_batches(
    data: str | None,
    model: UserModel,
    samples: int | None,
    batch_size: int,
    sequence_length: int | None = None,
    data_dir: str | None = None,
) -> list[Batch]:
    """``samples`` examples (all when None) for ``model`` from ``data`` (see the module), in
    batches of ``batch_size``: ``(images, labels)`` when the labels are the model's classes
    (:func:`has_labels`), else ``(images,)``; ``(token_ids,)`` for text."""
    if model.inputs == "tokens":
        inputs = _tokens(data, model, samples, sequence_length)
        return [(part,) for part in inputs.split(batch_size)]
    images, labels = _images(data, model, samples, data_dir)
    if not has_labels(model, images, labels):
        return [(part,) for part in images.split(batch_size)]
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def has_labels(model: UserModel, images: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the dataset's labels are ``model``'s classes: it maps a batch of images to
    (N, classes) with as many classes as the labels have (a model with another head, e.g.
    3 classes on digits, gets the images alone). DataError naming the images' shape when
    ``model`` does not run on them."""
    try:
        with torch.no_grad():
            outputs = model.module(images[:2])
    except Exception as exc:  # any failure of the user's forward on these images
        raise DataError(
            f"{model.source} does not run on the data's images, of shape "
            f"{tuple(images[:2].shape)} ({type(exc).__name__}: {exc}); give --input-shape, the "
            "shape of one input it reads (the images are fitted to it), or other --data"
        ) from None
    classes = int(labels.max()) + 1 if labels.numel() else 0
    return outputs.ndim == 2 and outputs.shape[1] >= classes


def _images(
    data: str | None, model: UserModel, samples: int | None, data_dir: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    name = default_dataset() if data is None else data
    if name not in DATASETS:
        raise DataError(
            f"--data {name!r}: a model of images reads a dataset, one of {', '.join(DATASETS)}"
        )
    train = load_dataset(name, data_dir).train
    images, labels = train.images[:samples], train.labels[:samples]
    if model.kind == "hf":
        images = fit_images(images, image_shape(model.module.model))
    elif model.example is not None:  # a class given its input shape
        images = fit_input(images, tuple(model.example.shape[1:]), name)
    dtype = next((p.dtype for p in model.module.parameters() if p.is_floating_point()), None)
    return images if dtype is None else images.to(dtype), labels


def fit_input(images: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """N×C×H×W ``images`` as N×``shape``: fitted as :func:`fit_images` does to a C,H,W shape,
    or flattened to a single axis of C·H·W; DataError naming both shapes for any other."""
    if len(shape) == 3:
        return fit_images(images, (shape[0], shape[1], shape[2]))
    if len(shape) == 1 and shape[0] == images[0].numel():
        return images.flatten(1)
    have = "×".join(map(str, images.shape[1:]))
    raise DataError(
        f"--input-shape {','.join(map(str, shape))}: the images of {name} are {have}, which "
        "accord fits to a C,H,W shape (resized, channels repeated or averaged) or flattens to "
        f"one axis of {images[0].numel()}; give such a shape, or data of the shape the model "
        "reads"
    )


def fit_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """N×C×H×W ``images`` as N×``shape``: resized bilinearly, grey repeated to colour channels
    or colour averaged to grey."""
    channels, height, width = shape
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise DataError(
        f"the dataset's images have {have} channels, the model reads {channels}; choose a "
        "dataset with 1 or that many channels"
    )


def _tokens(
    data: str | None, model: UserModel, samples: int | None, given: int | None
) -> torch.Tensor:
    limit = sequence_limit(model.module.model)
    length = given or min(SEQUENCE_LENGTH, limit or SEQUENCE_LENGTH)
    if limit is not None and length > limit:
        raise DataError(
            f"--sequence-length {length} exceeds the model's {limit} positions; give at most "
            f"{limit}"
        )
    vocab = int(model.module.model.config.vocab_size)
    if data is None:
        raise DataError(
            f"{model.source} is a text model: give --data, a .txt file (tokenized with the "
            f"folder's tokenizer), a .json file of token ids, or {RANDOM_TOKENS} (a smoke test)"
        )
    if data == RANDOM_TOKENS:
        warnings.warn(
            f"--data {RANDOM_TOKENS}: a smoke test only; statistics of random tokens describe "
            "no text, so the alignment they give says nothing about the merged model's quality",
            stacklevel=2,
        )
        count = samples if samples is not None else 256
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (count, length), generator=generator)
    ids = _read_ids(Path(data), model)
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(
            f"{data}: token ids must lie in 0..{vocab - 1} (the model's vocabulary), found "
            f"{int(ids.min())}..{int(ids.max())}; the ids come from another tokenizer"
        )
    count = ids.numel() // length
    if count == 0:
        raise DataError(
            f"{data} gives {ids.numel()} tokens, fewer than one sequence of {length}; give more "
            "text or a smaller --sequence-length"
        )
    sequences = ids[: count * length].view(count, length)
    return sequences[:samples]


def _read_ids(path: Path, model: UserModel) -> torch.Tensor:
    if not path.is_file():
        raise DataError(
            f"--data {path}: no such file; give a .txt or .json file, or {RANDOM_TOKENS}"
        )
    if path.suffix == ".json":
        try:
            ids = _flatten(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise DataError(
                f"{path}: expected JSON token ids (a list of ints, or of lists of ints): {exc}"
            ) from None
        return torch.tensor(ids, dtype=torch.long)
    if path.suffix == ".txt":
        tokenizer = _tokenizer(model.source, path)
        text = path.read_text(encoding="utf-8")
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    raise DataError(f"--data {path}: give a .txt file (text) or a .json file (token ids)")


def _flatten(value: Any) -> list[int]:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return value
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [i for part in value for i in _flatten(part)]
    raise ValueError("found something else")


def _tokenizer(folder: Path, text: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"--data {text}: tokenizing text needs the model folder's tokenizer files, which "
            f"{folder} lacks or cannot load ({exc}); copy them there "
            "(tokenizer.save_pretrained(folder)) or give token ids as a .json file"
        ) from None
