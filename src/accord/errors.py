"""The errors accord raises.

Every error derives from :class:`AccordError`; each also derives from the built-in exception
that fits, so ``except ValueError`` keeps working for callers who do not know accord.
Messages name the thing at fault (layer, file, key) and say what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AccordError(Exception):
    """Base class of every error accord raises on purpose."""


class DataError(AccordError, ValueError):
    """A dataset is missing, truncated, corrupt or asked for by an unknown name."""


class ModelError(AccordError, ValueError):
    """A model name, configuration or checkpoint is invalid."""


class StoreError(AccordError, ValueError):
    """A model store entry is inconsistent (weights do not match its JSON, missing files)."""


class CheckpointError(StoreError, ModelError):
    """A checkpoint folder (accord's or Hugging Face's) is missing, incomplete, corrupt, or its
    weights do not match its config.json; caught as either of its bases."""


class OutputError(StoreError):
    """An output folder cannot be written: it is accord's input, holds what accord did not
    write, already exists without overwrite, or lies where nothing can be written."""


class SpecError(AccordError, ValueError):
    """A feature-space spec does not describe the model, or breaks its function."""


class TraceError(AccordError, RuntimeError):
    """Neither torch.fx nor torch.export could trace a model."""


class ConfigError(AccordError, ValueError):
    """A configuration file or option is invalid."""


class MergeError(AccordError, ValueError):
    """Models cannot be merged as asked (shapes differ, no data for a data-driven method, ...)."""


class StatisticsError(AccordError, ValueError):
    """Activation statistics could not be computed (non-finite activations, too few samples)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix for the closest choice, or "" if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
