"""mergekit's YAML, read unchanged and translated into an accord merge with mergekit's semantics.

``accord llm-merge CONFIG.yml OUT`` takes the files ``mergekit-yaml CONFIG.yml OUT`` takes::

    models:
      - model: models/mistral-instruct
        parameters: {density: 0.5, weight: 0.5}
      - model: models/biomistral
        parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}   # a gradient across the layers
    merge_method: ties
    base_model: models/mistral-base
    parameters: {normalize: false, int8_mask: true}
    dtype: float16

Methods: ``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare_linear`` (accord's
``dare``), ``dare_ties``, ``della``, ``della_linear``, ``breadcrumbs``, ``breadcrumbs_ties``,
``sce``, ``model_stock`` and ``nuslerp`` (its ``base_model`` optional). Parameters as mergekit
reads them: per model ``weight`` (required where the method weighs models), ``density`` (the
fraction kept, default 1), ``epsilon`` (DELLA, default 0.15) and ``gamma`` (Breadcrumbs,
default 0.01), found in the model's ``parameters``, then in the global ones; globally
``normalize``, ``lambda`` (accord's ``scale``), ``rescale`` (mergekit rescales pruned task
vectors to their L1 norm: accord's ``rescale: l1``), ``int8_mask`` (a memory switch of
mergekit's with no effect on the result), slerp's ``t``, SCE's ``select_topk`` (default 1),
Model Stock's ``filter_wise`` (default false) and NuSLERP's ``nuslerp_flatten`` (default true)
and ``nuslerp_row_wise`` (default false); each with mergekit's defaults (``normalize``: true
for linear, TIES and DELLA, false otherwise; ``rescale``: true for DARE and DELLA). Values
are numbers, gradients or filters (:mod:`accord.llm.settings`).
``base_model`` is the task vectors' base (listed among ``models`` or not) and slerp's ``t = 0``
end. ``dtype`` and ``out_dtype`` set the output dtype (accord computes in float32 whatever
they say); ``tokenizer_source`` (``base`` or a model folder) names the folder whose tokenizer
files are copied, by default the base model's (else the first model's) when it has them, as
mergekit does.

Refused, by key: mergekit's other methods, ``slices`` and ``modules`` (layer ranges),
``tokenizer_source: union`` and ``tokenizer``/``chat_template`` (vocabulary surgery), models that
are not local folders (accord never reads the Hugging Face hub), and parameters the method does
not read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from accord.config import validated
from accord.errors import ConfigError, did_you_mean
from accord.llm.io import tokenizer_files
from accord.llm.merge import setting_problems
from accord.llm.settings import Filtered, Setting, map_setting, parse_setting
from accord.registry import COMBINERS


@dataclass(frozen=True)
class MergekitMethod:
    """A mergekit method accord runs: accord's name for it, the global and per-model parameters
    mergekit reads for it, mergekit's defaults (``normalize``, ``rescale``; None where the
    method has no such switch), whether its ``base_model`` may be left out, and what the
    ``base_model`` is to it (``base``): the task vectors' origin (``"task_vectors"``), one of
    the models it merges, which must be listed (``"listed"``: linear), or the first of the two
    it interpolates, ``t = 0`` (``"first"``: slerp)."""

    accord: str
    parameters: tuple[str, ...]
    model_parameters: tuple[str, ...]
    normalize: bool | None = None
    rescale: bool | None = None
    base_optional: bool = False
    base: Literal["task_vectors", "listed", "first"] = "task_vectors"


_GTA = ("normalize", "lambda", "int8_mask")
_DELLA = ("weight", "density", "epsilon")
_BREADCRUMBS = ("weight", "density", "gamma")

MERGEKIT_METHODS = {
    "linear": MergekitMethod("linear", ("normalize",), ("weight",), normalize=True, base="listed"),
    "slerp": MergekitMethod("slerp", ("t",), (), base="first"),
    "task_arithmetic": MergekitMethod("task_arithmetic", _GTA, ("weight",), normalize=False),
    "ties": MergekitMethod(
        "ties", (*_GTA, "rescale"), ("weight", "density"), normalize=True, rescale=False
    ),
    "dare_ties": MergekitMethod(
        "dare_ties", (*_GTA, "rescale"), ("weight", "density"), normalize=False, rescale=True
    ),
    "dare_linear": MergekitMethod(
        "dare", (*_GTA, "rescale"), ("weight", "density"), normalize=False, rescale=True
    ),
    "della": MergekitMethod("della", (*_GTA, "rescale"), _DELLA, normalize=True, rescale=True),
    "della_linear": MergekitMethod(
        "della_linear", (*_GTA, "rescale"), _DELLA, normalize=False, rescale=True
    ),
    "breadcrumbs": MergekitMethod(
        "breadcrumbs", (*_GTA, "rescale"), _BREADCRUMBS, normalize=False, rescale=False
    ),
    "breadcrumbs_ties": MergekitMethod(
        "breadcrumbs_ties", (*_GTA, "rescale"), _BREADCRUMBS, normalize=False, rescale=False
    ),
    "sce": MergekitMethod("sce", ("select_topk", "int8_mask"), ()),
    "model_stock": MergekitMethod("model_stock", ("filter_wise",), ()),
    "nuslerp": MergekitMethod(
        "nuslerp", ("nuslerp_flatten", "nuslerp_row_wise"), ("weight",), base_optional=True
    ),
}

# mergekit's defaults of the parameters that accord passes on under the same name.
MERGEKIT_DEFAULTS = {
    "epsilon": 0.15,
    "gamma": 0.01,
    "select_topk": 1.0,
    "filter_wise": False,
    "nuslerp_flatten": True,
    "nuslerp_row_wise": False,
}

# mergekit's methods that accord does not run.
UNSUPPORTED_METHODS = (
    "arcee_fusion",
    "karcher",
    "multislerp",
    "nearswap",
    "passthrough",
    "ram",
    "ramplus_tl",
)

# mergekit's slerp interpolates linearly above this |cos Ω| (its DOT_THRESHOLD).
MERGEKIT_LERP_COSINE = 0.9995

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_SWITCHES = (
    "normalize",
    "int8_mask",
    "rescale",
    "filter_wise",
    "nuslerp_flatten",
    "nuslerp_row_wise",
)


class MergekitModel(BaseModel):
    """An entry of mergekit's ``models``."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] | None = None


class MergekitConfig(BaseModel):
    """The keys of a mergekit config (``mergekit/config.py``'s ``MergeConfiguration``)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[MergekitModel] | None = None
    slices: Any = None
    modules: Any = None
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any = None
    chat_template: str | None = None


def is_mergekit_config(data: dict[str, Any]) -> bool:
    """Whether YAML data is a mergekit config (it names ``merge_method``)."""
    return "merge_method" in data


def translate_mergekit_config(
    data: dict[str, Any], where: str = "mergekit config"
) -> dict[str, Any]:
    """accord's config data (for :func:`accord.llm.config.validate_llm_merge_config`,
    without ``output``) doing what mergekit does with ``data``; ConfigError naming every problem
    by its mergekit key."""
    if "method" in data:
        raise ConfigError(
            f"{where}: both merge_method (mergekit's) and method (accord's) are set; keep one"
        )
    config = validated(MergekitConfig, data, where, _fields)
    problems = _structure_problems(config)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    method = MERGEKIT_METHODS[config.merge_method]
    translated, problems = _translate(config, method)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return translated


def _fields(path: list[str]) -> Iterable[str]:
    """The keys known where a key of ``path`` stands."""
    return (MergekitModel if path[0] == "models" else MergekitConfig).model_fields


def _structure_problems(config: MergekitConfig) -> list[str]:
    """What accord cannot do with this config, whatever its models."""
    name = config.merge_method
    if name in UNSUPPORTED_METHODS:
        return [
            f"merge_method: mergekit's {name!r} is not implemented in accord; accord runs "
            f"{', '.join(MERGEKIT_METHODS)}"
        ]
    if name not in MERGEKIT_METHODS:
        hint = did_you_mean(name, [*MERGEKIT_METHODS, *UNSUPPORTED_METHODS])
        return [
            f"merge_method: {name!r} is unknown{hint}; accord runs {', '.join(MERGEKIT_METHODS)}"
        ]
    problems = []
    for key in ("slices", "modules"):
        if getattr(config, key) is not None:
            problems.append(
                f"{key}: layer ranges (frankenmerges, passthrough) are not supported; to merge "
                "whole models, list them under models: (mergekit reads that the same way)"
            )
    if config.models is None and not problems:
        problems.append("models: no models to merge")
    if config.tokenizer is not None or config.chat_template is not None:
        key = "tokenizer" if config.tokenizer is not None else "chat_template"
        problems.append(
            f"{key}: accord copies a model's tokenizer files (tokenizer_source) but does not "
            "build tokenizers or templates; remove it"
        )
    if config.tokenizer_source == "union":
        problems.append(
            "tokenizer_source: union builds a merged vocabulary, which accord does not do; use "
            "base or a model folder (the models must share one vocabulary)"
        )
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None and value.removeprefix("torch.") not in _DTYPES:
            problems.append(f"{key}: {value!r}; expected one of {', '.join(_DTYPES)}")
    return problems


def _translate(config: MergekitConfig, method: MergekitMethod) -> tuple[dict[str, Any], list[str]]:
    name = config.merge_method
    entries = config.models or []
    problems = [
        f"models[{i}].model: {entry.model} is not a directory; accord reads local checkpoint "
        "folders only (never the Hugging Face hub): download it and give its folder"
        for i, entry in enumerate(entries)
        if not Path(entry.model).is_dir()
    ]
    base = config.base_model
    if base is not None and not Path(base).is_dir():
        problems.append(f"base_model: {base} is not a directory; give a local checkpoint folder")
    shared = dict(config.parameters or {})
    problems += _parameter_problems(
        "parameters", shared, name, (*method.parameters, *method.model_parameters)
    )
    listed = [(i, e) for i, e in enumerate(entries) if base is None or e.model != base]
    if method.base == "listed":
        if base is not None and len(listed) == len(entries):
            problems.append(
                f"base_model: mergekit's linear merges the listed models only; list {base} "
                "under models (with a weight) or remove base_model"
            )
        listed = list(enumerate(entries))
    elif base is None and not method.base_optional:
        problems.append(f"base_model: mergekit's {name} needs a base_model")
    for i, entry in listed:
        own = dict(entry.parameters or {})
        problems += _parameter_problems(
            f"models[{i}].parameters", own, name, method.model_parameters
        )
        if "weight" in method.model_parameters and "weight" not in own and "weight" not in shared:
            problems.append(
                f"models[{i}].parameters.weight: mergekit's {name} needs a weight for every "
                "model (here or under parameters)"
            )
    if method.base == "first":
        if len(listed) != 1:
            problems.append(
                f"models: mergekit's {name} interpolates base_model and one other model, got "
                f"{len(listed)} besides the base"
            )
        if "t" not in shared:
            problems.append(
                f"parameters.t: mergekit's {name} needs t (0: base_model, 1: the other)"
            )
    if not listed and method.base != "first":
        problems.append("models: no model to merge besides base_model")
    if problems:
        return {}, problems
    return _accord_data(config, method, listed, shared), []


def _parameter_problems(
    where: str, given: dict[str, Any], method: str, accepted: tuple[str, ...]
) -> list[str]:
    problems = []
    for key, value in given.items():
        if key not in accepted:
            known = key in {"weight", "density", "t", "lambda", *MERGEKIT_DEFAULTS, *_SWITCHES}
            reason = f"has no effect on mergekit's {method}" if known else "is not a parameter"
            hint = "" if known else did_you_mean(key, accepted)
            problems.append(
                f"{where}.{key} {reason}{hint} (it reads {', '.join(accepted) or 'none'}); "
                "remove it"
            )
        elif key in _SWITCHES:
            if not isinstance(value, bool):
                problems.append(f"{where}.{key}={value!r}: expected true or false")
        else:
            limit = {"lambda": "scale"}.get(key, key)
            problems += setting_problems(f"{where}.{key}", limit, value)
    return problems


def _accord_data(
    config: MergekitConfig,
    method: MergekitMethod,
    listed: list[tuple[int, MergekitModel]],
    shared: dict[str, Any],
) -> dict[str, Any]:
    base = config.base_model
    # mergekit's density is the fraction kept; a combiner that drops at random takes the
    # fraction dropped (its record's drop_rate) instead
    dare = "drop_rate" in COMBINERS[method.accord].defaults
    density_key = "drop_rate" if dare else "density"

    def density(setting: Setting) -> Setting:
        # mergekit's DARE density is the fraction kept; accord's drop_rate the fraction dropped
        return map_setting(setting, lambda kept: 1 - kept) if dare else setting

    models = []
    for _, entry in listed:
        own = entry.parameters or {}
        model: dict[str, Any] = {"path": entry.model}
        if "weight" in own:
            model["weight"] = parse_setting(own["weight"])
        if "density" in own:
            model[density_key] = density(parse_setting(own["density"]))
        for key in ("epsilon", "gamma"):
            if key in own:
                model[key] = parse_setting(own[key])
        models.append(model)
    parameters: dict[str, Any] = {}
    if "weight" in shared:
        parameters["weight"] = parse_setting(shared["weight"])
    if "density" in method.model_parameters:
        parameters[density_key] = density(_with_default(shared.get("density"), 1.0))
    if "lambda" in method.parameters:
        parameters["scale"] = _with_default(shared.get("lambda"), 1.0)
    if "t" in method.parameters:
        parameters["t"] = parse_setting(shared["t"])
        parameters["lerp_cosine"] = MERGEKIT_LERP_COSINE
    for key, default in MERGEKIT_DEFAULTS.items():
        if key in method.parameters or key in method.model_parameters:
            given = shared.get(key, default)
            parameters[key] = bool(given) if key in _SWITCHES else _with_default(given, default)
    if method.normalize is not None:
        parameters["normalize"] = bool(shared.get("normalize", method.normalize))
    if method.rescale is not None:
        parameters["rescale"] = "l1" if shared.get("rescale", method.rescale) else "none"
    data: dict[str, Any] = {"method": method.accord, "parameters": parameters}
    if method.base == "first":
        data["models"] = [{"path": base}, *models]  # t = 0 is the base, as in mergekit
    else:
        data["models"] = models
        if method.base == "task_vectors":
            data["base"] = base
    dtype = config.out_dtype or config.dtype
    if dtype is not None:
        data["dtype"] = _DTYPES[dtype.removeprefix("torch.")]
    tokenizer = _tokenizer_source(config, [entry.model for _, entry in listed])
    if tokenizer is not None:
        data["tokenizer_source"] = tokenizer
    return data


def _with_default(value: Any, default: float) -> Setting:
    """A global setting whose filters that match no tensor fall back to mergekit's default, as
    mergekit's parameter lookup does."""
    if value is None:
        return default
    setting = parse_setting(value)
    if isinstance(setting, tuple) and isinstance(setting[0], Filtered):
        return (*setting, Filtered(None, default))  # type: ignore[return-value]
    return setting


def _tokenizer_source(config: MergekitConfig, models: list[str]) -> str | None:
    """The folder whose tokenizer files are copied: ``tokenizer_source`` (``base``: the base
    model, else the first), or by default the base's (else the first model's) if it has any."""
    donor = config.base_model or models[0]
    if config.tokenizer_source is None:
        return donor if tokenizer_files(donor) else None
    return donor if config.tokenizer_source == "base" else config.tokenizer_source
