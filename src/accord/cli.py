"""The ``accord`` command: train, evaluate, trace, merge and demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import accord
from accord._table import format_table
from accord.config import MergeConfig, load_merge_config, validate_merge_config
from accord.demo import DEMO_MODELS
from accord.errors import AccordError, ConfigError
from accord.merge import check_options, split_options
from accord.models import is_hf_folder, load_user_model, uses_user_models
from accord.models.imported import build_imported
from accord.models.merging import run_user_merge
from accord.registry import ALIGNMENTS, COMBINERS, Option, plan_methods
from accord.store import SNAPSHOTS

DEFAULT_STORE = os.environ.get("ACCORD_STORE", "models")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "-" in text and "," not in text:
            start, stop = (int(x) for x in text.split("-"))
            return tuple(range(start, stop + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected e.g. 0,1,2 or 0-3") from exc


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _key_value(pair: str, flag: str, example: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} {example}")
    return key, value


def _model_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, value = _key_value(pair, "--model-option", "depth=2")
        lowered = value.lower()
        options[key] = lowered == "true" if lowered in ("true", "false") else _number(value)
    return options


def _method_options(pairs: Sequence[str], config: MergeConfig) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs, each parsed by the type its record gives the option of
    the alignment or combiner ``config`` asks for (``align=`` and ``combine=`` name them too)."""
    texts = dict(_key_value(pair, "--option", "ridge=0.1") for pair in pairs)
    if config.method == "all":  # the options differ per method: the config refuses any
        return texts
    methods = {key: texts.pop(key) for key in ("align", "combine") if key in texts}
    request = {"align": config.align, "combine": config.combine, **methods}
    try:
        plan = plan_methods(config.method, **request)
        split_options(plan, texts)
    except AccordError as exc:
        raise ConfigError(f"--option: {exc}") from None
    options: dict[str, Any] = {}
    for record in (plan.align, plan.combine):
        for option in record.options:
            if option.name in texts:
                options[option.name] = _parsed(option, texts[option.name])
    try:  # each value in its record's range, before any checkpoint is read
        check_options(plan, options, len(config.models))
    except AccordError as exc:
        raise ConfigError(f"--option: {exc}") from None
    return {**methods, **options}


def _parsed(option: Option, text: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as exc:
        raise ConfigError(f"--option {option.name}={text}: {exc}") from None


def _choices(field: str) -> str:
    """The registered names a merge config field takes, for its help (a combiner that needs
    a base is marked: it takes --base)."""
    combiners = sorted(
        f"{name} (--base)" if r.needs.base == "yes" else name for name, r in COMBINERS.items()
    )
    tables = {
        "method": ["all", *sorted(ALIGNMENTS), *combiners],
        "align": sorted(ALIGNMENTS),
        "combine": combiners,
    }
    return f"; one of {', '.join(tables[field])}" if field in tables else ""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's files (default: $ACCORD_DATA/<name> or "
        "/usr/share/datasets/<name>)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a set of models from seeds into the model store")
    p.add_argument("--arch", required=True, help=f"model: {', '.join(accord.MODELS)}")
    p.add_argument(
        "--dataset", default="auto", help="dataset name, or auto (Fashion-MNIST, else digits)"
    )
    p.add_argument(
        "--seeds", type=_seeds, default=(0, 1), help="e.g. 0,1,2 or 0-3 (one model each)"
    )
    p.add_argument(
        "--split",
        default="iid",
        help=f"data split: {', '.join(accord.data.SPLIT_MODES)} [%(default)s]",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration (split dirichlet) [%(default)s]",
    )
    defaults = accord.TrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate [%(default)s]")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="[%(default)s]")
    p.add_argument(
        "--crop-padding",
        type=int,
        default=defaults.crop_padding,
        metavar="K",
        help="random crops: pad by K background pixels, crop back at a random shift "
        "[%(default)s: none]",
    )
    p.add_argument("--width", type=_number, default=None, help="width (multiplier, or MLP units)")
    p.add_argument("--depth", type=int, default=None, help="MLP hidden layers / ViT blocks")
    p.add_argument("--batch-norm", action="store_true", help="VGG with BatchNorm")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None, help="use this many train/test examples")
    p.add_argument("--store", default=DEFAULT_STORE, help="model store folder [%(default)s]")
    p.add_argument(
        "--keep-every",
        type=accord.Keep.parse,
        default=None,
        metavar="K[s|e]",
        help="also store a checkpoint every K steps (50, 50s) or epochs (2e), in <model>/steps/",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="CHECKPOINT",
        help="start every model from this stored checkpoint (fine-tuning experts from a base)",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    model = _model_options(args.model_option)
    for key in ("width", "depth"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    if args.batch_norm:
        model["batch_norm"] = True
    dataset = accord.default_dataset() if args.dataset == "auto" else args.dataset
    request = accord.ModelSetRequest(
        arch=args.arch,
        dataset=dataset,
        seeds=args.seeds,
        split=args.split,
        alpha=args.alpha,
        model=model,
        train=accord.TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            crop_padding=args.crop_padding,
        ),
        limit=args.limit,
        data_dir=args.data_dir,
        keep=args.keep_every,
        init=args.init,
    )
    checkpoints = accord.train_model_set(
        request, args.store, device=args.device, progress=not args.quiet
    )
    rows = [_checkpoint_row(c) for c in checkpoints]
    print(format_table(["model", "val acc", "test acc"], rows))
    return 0


def _checkpoint_row(checkpoint: accord.Checkpoint) -> list[Any]:
    metrics = checkpoint.config.get("metrics", {})
    return [
        str(checkpoint.path),
        metrics.get("val_accuracy", "-"),
        metrics.get("test_accuracy", "-"),
    ]


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate stored models and their logit-averaging ensemble")
    p.add_argument("models", nargs="*", help="checkpoint folders (default: every model in --store)")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.add_argument(
        "--steps",
        action="store_true",
        help="also each model's intermediate checkpoints (accord train --keep-every), in order",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    paths = [Path(m) for m in args.models] or accord.list_checkpoints(args.store)
    checkpoints = [accord.load_checkpoint(p, device=args.device) for p in paths]
    data = accord.checkpoint_dataset(checkpoints, data_dir=args.data_dir)
    rows = []
    for path, checkpoint in zip(paths, checkpoints, strict=True):
        kept = accord.training_steps(path)[:-1] if args.steps else []
        for step in [*(accord.load_checkpoint(p, device=args.device) for p in kept), checkpoint]:
            val = accord.evaluate(step.model, data.val, device=args.device)
            test = accord.evaluate(step.model, data.test, device=args.device)
            name = (
                f"{checkpoint.name}/{SNAPSHOTS}/{step.name}"
                if step is not checkpoint
                else step.name
            )
            rows.append([name, val.accuracy, test.accuracy, test.loss])
    if len(checkpoints) > 1:
        models = [c.model for c in checkpoints]
        val = accord.evaluate_ensemble(models, data.val, device=args.device)
        test = accord.evaluate_ensemble(models, data.test, device=args.device)
        rows.append([f"ensemble of {len(models)}", val.accuracy, test.accuracy, test.loss])
    print(format_table(["model", "val acc", "test acc", "test loss"], rows))
    return 0


def _add_spec(sub: Any) -> None:
    p = sub.add_parser("spec", help="trace a model and print its feature spaces")
    p.add_argument(
        "source",
        nargs="?",
        metavar="MODEL",
        help=f"a checkpoint folder, a Hugging Face model folder, a zoo name "
        f"({', '.join(accord.MODELS)}), or the weights file of --model",
    )
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--model",
        default=None,
        metavar="MODULE:CLASS",
        help="your nn.Module class (mypkg.nets:Net)",
    )
    p.add_argument(
        "--model-args",
        type=yaml.safe_load,
        default=None,
        metavar="JSON",
        help="its constructor arguments, e.g. '{\"width\": 2}'",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        metavar="C,H,W",
        help="the shape of one input of --model, without the batch axis",
    )
    p.add_argument("--pre-activation", action="store_true", help="observe before nonlinearities")
    p.add_argument("--save", default=None, help="also write the spec as JSON here")
    p.set_defaults(func=_cmd_spec)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: expected e.g. 3,32,32")
    return shape


def _spec_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model ``accord spec`` traces and its example input."""
    if args.model is not None:
        if args.input_shape is None:
            raise ConfigError("--model needs --input-shape (one input, e.g. 3,32,32)")
        if args.model_args is not None and not isinstance(args.model_args, dict):
            raise ConfigError(f"--model-args {args.model_args!r}: expected a JSON object")
        if args.source is None:  # the structure, without weights
            model = build_imported(args.model, args.model_args)
            return model.eval(), torch.randn(2, *args.input_shape)
        user = load_user_model(args.source, args.model, args.model_args, args.input_shape)
        return user.module, user.example
    if args.source is None:
        raise ConfigError("give a model: a folder, a zoo name, or --model MODULE:CLASS")
    if is_hf_folder(args.source):
        user = load_user_model(args.source)
        return user.module, user.example
    if Path(args.source).is_dir():
        model = accord.load_checkpoint(args.source).model
    else:
        options = _model_options(args.model_option)
        for key in ("in_channels", "image_size"):
            if getattr(args, key) is not None:
                options[key] = getattr(args, key)
        model = accord.build_model(args.source, **options)
    return model, accord.example_input(accord.model_config(model))


def _cmd_spec(args: argparse.Namespace) -> int:
    model, example = _spec_model(args)
    spec = accord.trace(model, example, observe="pre" if args.pre_activation else "post")
    print(accord.spec_table(spec))
    if args.save:
        spec.save(args.save)
        print(f"spec written to {args.save}")
    return 0


def _add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge stored models (one method, or --method all for a comparison table)",
        description="Options come from accord.config.MergeConfig; a YAML --config gives the "
        "same keys, and command-line options override it.",
    )
    p.add_argument(
        "models",
        nargs="*",
        help="checkpoint folders from `accord train`, Hugging Face model folders, or weights "
        "files of --model",
    )
    p.add_argument("--config", default=None, help="YAML merge config (keys as below)")
    for name, info in MergeConfig.model_fields.items():
        if name in ("models", "options"):
            continue
        flag = "--out" if name == "output" else "--" + name.replace("_", "-")
        # SUPPRESS: a flag not given leaves no attribute, so a given `null` (--out null,
        # --samples null) still reaches the config, which decides what it means.
        if info.annotation is bool:
            p.add_argument(
                flag,
                dest=name,
                action="store_true",
                default=argparse.SUPPRESS,
                help=info.description,
            )
        else:
            p.add_argument(
                flag,
                dest=name,
                type=yaml.safe_load,
                default=argparse.SUPPRESS,
                help=f"{info.description or name} "
                f"[{info.get_default(call_default_factory=True)}]{_choices(name)}",
            )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. ridge=0.1 (repeatable)",
    )
    p.add_argument("--auto", action="store_true", help="choose the method's options on validation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    given = {
        name: getattr(args, name)
        for name in MergeConfig.model_fields
        if hasattr(args, name) and name not in ("models", "options")
    }
    if args.models:
        given["models"] = args.models
    if args.auto:
        given["options"] = "auto"
    elif args.option:
        given["options"] = {}  # parsed below, by the types of the method's options
    if args.config:
        config = load_merge_config(args.config, **given)
    else:
        config = validate_merge_config(given, where="accord merge")
    if args.option and not args.auto:
        options = _method_options(args.option, config)
        config = config.model_copy(update={"options": options})
    if uses_user_models(config.models, config.model):
        user = run_user_merge(config, progress=not args.quiet)
        print(format_table(["model", "top-1 agreement with the ensemble"], user.rows()))
    else:
        outcome = accord.run_merge(config, progress=not args.quiet)
        print(format_table(["model", "val acc", "test acc"], outcome.rows()))
    if config.output:
        print(f"written to {config.output}")
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help=f"train {DEMO_MODELS} small models (or reuse them) and compare merges"
    )
    p.add_argument(
        "--dataset", default="auto", help="auto: Fashion-MNIST when installed, else digits"
    )
    p.add_argument("--store", default=DEFAULT_STORE)
    _add_common(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from accord.demo import run_demo

    print(
        run_demo(
            args.dataset,
            args.store,
            device=args.device,
            data_dir=args.data_dir,
            progress=not args.quiet,
        )
    )
    return 0


def _add_llm_merge(sub: Any) -> None:
    p = sub.add_parser(
        "llm-merge",
        help="merge Hugging Face checkpoints from a YAML config, accord's or mergekit's",
    )
    p.add_argument("config", help="YAML: accord's (method, models, ...) or mergekit's")
    p.add_argument(
        "output", nargs="?", default=None, help="output folder (replaces the config's output)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_llm_merge)


def _cmd_llm_merge(args: argparse.Namespace) -> int:
    from accord.llm.cli import llm_merge_main

    return llm_merge_main(args.config, args.output, progress=not args.quiet)


def _add_bench(sub: Any) -> None:
    from accord.bench.cli import add_bench_parser

    add_bench_parser(sub)


def _add_analyze(sub: Any) -> None:
    from accord.analysis import add_analyze_parser

    add_analyze_parser(sub)


def _add_select(sub: Any) -> None:
    from accord.analysis.selection_report import add_select_parser

    add_select_parser(sub)


def _add_visualize(sub: Any) -> None:
    from accord.analysis.visualize import add_visualize_parser

    add_visualize_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accord",
        description="Align and merge neural networks (CCA Merge and its baselines).",
    )
    parser.add_argument("--version", action="version", version=f"accord {accord.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (_add_train, _add_eval, _add_spec, _add_merge, _add_demo, _add_analyze, _add_bench)
    for add in (*commands, _add_select, _add_visualize, _add_llm_merge):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AccordError as exc:
        print(f"accord {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
