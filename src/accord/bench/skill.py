"""Skill-transfer benchmark: a task vector added to a receiver that diverged from its base.

Horoi et al. (2025) find that a task vector ``τ = θ_finetuned − θ_base`` transfers a skill
poorly to a *receiver* that trained away from ``θ_base``, and that moving the receiver into the
base's coordinates first (the exact permutation, rotation and scale symmetries of the
transformer, :func:`accord.llm.align`) recovers much of it. This benchmark builds that
setting at a size that trains on one CPU core in minutes:

- character-level corpora (:mod:`accord.bench.skill_corpus`): *general* string tasks
  (``c:ab3>ab3`` copy, ``r:`` reverse, ``s:`` sort), the *receiver* corpus (``r:``, ``h:``
  shift each symbol by one, ``d:`` double each symbol) and the *skill*, additions
  (``123+45=168``, operands of 1 to ``digits`` digits);
- the *base*: a tiny Llama with grouped-query attention trained from scratch on the general
  corpus; the *fine-tune*: the base trained on additions mixed with general lines; ``τ`` is
  their difference;
- receivers: ``continued@k``, the base after ``k`` steps of training on the receiver corpus
  (same initialisation, other data; ``k`` sweeps the divergence); the first of them moved by a
  random exact symmetry (the same function in other coordinates: what alignment must undo);
  and ``independent``, another random initialisation trained like the base (same data, other
  initialisation: the strongly diverged case);
- for each receiver, alignment to the base (none, from weights, from activations on
  general-corpus windows) and method (task arithmetic, TIES, DARE on τ alone): ``receiver +
  λ τ'``, ``λ`` chosen on validation additions by exact-match accuracy of greedy answers; at
  that ``λ``, the accuracy on test additions and the loss on held-out text of the receiver's
  own corpus.

Trained models are cached in the model store (``skill-<role>-<digest>``): reruns only evaluate.
"""

from __future__ import annotations

import copy
import os
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from accord._io import write_json
from accord._table import format_table
from accord.bench._common import machine_info, run_facts, today
from accord.bench.skill_corpus import (
    CORPORA,
    VOCABULARY,
    addition_problems,
    decode,
    encode,
    general_text,
    skill_text,
)
from accord.combine._state_dicts import per_model
from accord.errors import StoreError
from accord.llm import (
    align,
    load_state_and_config,
    random_symmetry,
    save_checkpoint,
)
from accord.registry import COMBINERS, resolve_options
from accord.store import store_entry

ALIGNMENTS = {"none": "unaligned", "weights": "weights", "activations": "activations"}
METHODS = {name: COMBINERS[name].label for name in ("task_arithmetic", "ties", "dare")}


@dataclass(frozen=True)
class SkillPlan:
    """Everything one skill-transfer run does; written into its JSON."""

    name: str
    command: str
    base_steps: int  # the base's and the independent receiver's
    skill_steps: int
    receiver_steps: int  # continued training of the base on the receiver corpus
    snapshots: tuple[int, ...]  # earlier steps of it also evaluated as receivers
    digits: int = 3
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    block: int = 32  # tokens per training window
    batch_size: int = 64
    lr: float = 3e-3  # base and independent receiver, trained from scratch
    finetune_lr: float = 2e-3  # high enough to learn additions in minutes
    receiver_lr: float = 3e-4  # a gentle drift (why: BENCHMARKS.md, design choices)
    replay: float = 0.25  # fraction of general lines in the fine-tune's corpus
    corpus_lines: int = 50_000
    val_problems: int = 200
    test_problems: int = 500
    eval_windows: int = 128  # held-out windows of each corpus for the losses
    calibration_windows: int = 128  # general-corpus windows for activation alignment
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    ties_density: float = 0.2
    dare_drop_rate: float = 0.5
    seed: int = 0

    def receivers(self) -> dict[str, str]:
        """Receiver name → its own corpus, in the order of the results."""
        steps = (*self.snapshots, self.receiver_steps)
        names = {f"continued@{k}": "receiver" for k in steps}
        return {**names, f"continued@{steps[0]} permuted": "receiver", "independent": "general"}


def skill_plan(quick: bool = False) -> SkillPlan:
    """The ``--quick`` plan (2-digit additions, minutes on one core) or the default one (3-digit
    additions, about a quarter of an hour)."""
    if quick:
        return SkillPlan(
            name="skill-transfer-quick",
            command="accord bench skill --quick",
            base_steps=600,
            skill_steps=750,
            receiver_steps=400,
            snapshots=(25, 100),
            digits=2,
            corpus_lines=20_000,
            val_problems=100,
            test_problems=300,
        )
    return SkillPlan(
        name="skill-transfer",
        command="accord bench skill",
        base_steps=2000,
        skill_steps=2000,
        receiver_steps=600,
        snapshots=(25, 100),
    )


def seed_for(plan_seed: int, use: str) -> int:
    """A seed for one use of randomness: stable across runs, different between uses."""
    return zlib.crc32(f"{plan_seed}/{use}".encode())


@dataclass(frozen=True)
class SkillData:
    """Token streams to train on, held-out windows and additions to evaluate on."""

    streams: dict[str, Tensor]  # general, receiver, skill
    answers: Tensor  # where the skill stream's loss is taken
    held_out: dict[str, Tensor]  # corpus → (windows, block) for the losses
    calibration: list[Tensor]  # general-corpus batches for activation alignment
    val: list[tuple[int, int]]
    test: list[tuple[int, int]]


def make_data(plan: SkillPlan) -> SkillData:
    """Every corpus and problem set of ``plan``, each from its own seed."""
    count = plan.val_problems + plan.test_problems
    problems = addition_problems(seed_for(plan.seed, "problems"), count, plan.digits)
    skill, answers = skill_text(
        seed_for(plan.seed, "skill"), plan.corpus_lines, plan.digits, set(problems), plan.replay
    )
    streams = {
        name: encode(general_text(seed_for(plan.seed, name), plan.corpus_lines, tasks))
        for name, tasks in CORPORA.items()
    }
    windows = plan.eval_windows + plan.calibration_windows
    lines = windows * plan.block // 8  # lines have 8 characters or more
    held_out = {
        name: encode(general_text(seed_for(plan.seed, f"{name}-held-out"), lines, tasks))
        for name, tasks in CORPORA.items()
    }
    held_out = {k: v[: windows * plan.block].reshape(windows, -1) for k, v in held_out.items()}
    return SkillData(
        streams={**streams, "skill": encode(skill)},
        answers=answers,
        held_out={name: w[: plan.eval_windows] for name, w in held_out.items()},
        calibration=list(held_out["general"][plan.eval_windows :].split(16)),
        val=problems[: plan.val_problems],
        test=problems[plan.val_problems :],
    )


def llama(plan: SkillPlan, seed: int) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``plan``'s sizes, randomly initialised from ``seed``."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=plan.hidden,
        intermediate_size=plan.intermediate,
        num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads,
        num_key_value_heads=plan.kv_heads,
        max_position_embeddings=plan.block,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def train(
    model: nn.Module,
    stream: Tensor,
    steps: int,
    lr: float,
    plan: SkillPlan,
    seed: int,
    *,
    answers: Tensor | None = None,
    snapshots: Collection[int] = (),
    desc: str = "train",
    progress: bool = True,
) -> dict[int, nn.Module]:
    """``model`` trained in place on random windows of ``stream`` (AdamW, learning rate ``lr``
    warmed up linearly over the first 5 % of steps, then decayed linearly to 0), the loss on
    the tokens ``answers`` marks (all by default): ``{steps: model}`` in eval mode, with a
    copy taken after each step count in ``snapshots``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps)
    )
    offsets, taken = torch.arange(plan.block), {}
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(
            0, len(stream) - plan.block, (plan.batch_size, 1), generator=generator
        )
        ids = stream[index + offsets]
        labels = ids if answers is None else ids.masked_fill(~answers[index + offsets], -100)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step in snapshots:
            taken[step] = copy.deepcopy(model).eval()
    return {**taken, steps: model.eval()}


def _keys(plan: SkillPlan) -> dict[str, dict[str, Any]]:
    """The store key of each trained model: everything its weights depend on."""
    base = {
        "role": "base",
        "sizes": [plan.hidden, plan.layers, plan.heads, plan.kv_heads, plan.intermediate],
        "vocabulary": VOCABULARY,
        "batches": [plan.block, plan.batch_size, plan.corpus_lines],
        "steps": plan.base_steps,
        "lr": plan.lr,
        "seed": plan.seed,
    }
    skill = [plan.digits, plan.replay, plan.val_problems, plan.test_problems, plan.finetune_lr]
    keys = {
        "base": base,
        "finetuned": {
            "parent": base,
            "role": "finetuned",
            "steps": plan.skill_steps,
            "skill": skill,
        },
        "independent": {**base, "role": "independent"},
    }
    for k in (*plan.snapshots, plan.receiver_steps):
        schedule = [plan.receiver_steps, plan.receiver_lr]
        keys[f"continued@{k}"] = {"parent": base, "role": "continued", "steps": k, "of": schedule}
    return keys


def _load_or_train(
    plan: SkillPlan,
    store: str | os.PathLike[str],
    keys: Mapping[str, dict[str, Any]],
    make: Callable[[], Mapping[str, nn.Module]],
) -> dict[str, nn.Module]:
    """The models ``keys`` names, from the store when all are there, else ``make()``'s, saved
    as checkpoint directories (which ``accord llm-merge`` reads too)."""
    paths = {name: store_entry(store, key, f"skill-{key['role']}") for name, key in keys.items()}
    if not all(path.exists() for path in paths.values()):
        made = make()
        for name, path in paths.items():
            config = {**made[name].config.to_dict(), "architectures": ["LlamaForCausalLM"]}
            state = made[name].state_dict()
            save_checkpoint(path, state, {**config, "accord_training": keys[name]}, overwrite=True)
    models = {}
    for name, path in paths.items():
        state, config = load_state_and_config(path)
        if config.get("accord_training") != keys[name]:
            raise StoreError(f"{path} was trained with another configuration; delete it to retrain")
        models[name] = llama(plan, 0)
        models[name].load_state_dict(state)
    return models


def trained_models(
    plan: SkillPlan, data: SkillData, store: str | os.PathLike[str], progress: bool = True
) -> dict[str, nn.Module]:
    """Base, fine-tune and every receiver of ``plan``, trained or loaded from ``store``."""
    keys = _keys(plan)

    def fit(names: list[str], start: Callable[[], nn.Module], stream: str, lr: float) -> Any:
        role, steps = keys[names[0]]["role"], {keys[name]["steps"]: name for name in names}
        answers = data.answers if stream == "skill" else None

        def make() -> dict[str, nn.Module]:
            seed = seed_for(plan.seed, f"{role}-batches")
            trained = train(
                start(),
                data.streams[stream],
                max(steps),
                lr,
                plan,
                seed,
                answers=answers,
                snapshots=steps,
                desc=role,
                progress=progress,
            )
            return {name: trained[k] for k, name in steps.items()}

        return _load_or_train(plan, store, {name: keys[name] for name in names}, make)

    def fresh(role: str) -> Callable[[], nn.Module]:
        return lambda: llama(plan, seed_for(plan.seed, role))

    models = fit(["base"], fresh("base"), "general", plan.lr)
    base = models["base"]
    continued = [name for name in keys if name.startswith("continued@")]
    models |= fit(["finetuned"], lambda: copy.deepcopy(base), "skill", plan.finetune_lr)
    models |= fit(continued, lambda: copy.deepcopy(base), "receiver", plan.receiver_lr)
    models |= fit(["independent"], fresh("independent"), "general", plan.lr)
    first = continued[0]
    models[f"{first} permuted"] = random_symmetry(models[first], seed=plan.seed)
    return models


@torch.no_grad()
def greedy_answers(model: Any, prompts: Sequence[str], max_new: int) -> list[str | None]:
    """Each prompt's greedy continuation up to its first newline (None when no newline comes
    within ``max_new`` tokens). ``model(input_ids=ids).logits`` gives (batch, length, vocab)
    logits; prompts of one length run as one batch, so no padding is needed."""
    answers: list[str | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in by_length.items():
        ids = torch.stack([encode(prompts[i]) for i in rows])
        for _ in range(max_new):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        for i, continuation in zip(rows, ids[:, length:].tolist(), strict=True):
            text = decode(continuation)
            answers[i] = text.split("\n")[0] if "\n" in text else None
    return answers


def addition_accuracy(model: Any, problems: Sequence[tuple[int, int]], digits: int) -> float:
    """Exact-match accuracy of the greedy answers to ``\\na+b=`` (a newline starts a line, as in
    training); an answer must end with a newline within ``digits + 2`` tokens."""
    answers = greedy_answers(model, [f"\n{a}+{b}=" for a, b in problems], digits + 2)
    hits = sum(answer == str(a + b) for answer, (a, b) in zip(answers, problems, strict=True))
    return hits / len(problems)


@torch.no_grad()
def corpus_loss(model: nn.Module, windows: Tensor) -> float:
    """Mean next-token cross-entropy (nats) over ``windows``."""
    return float(model(input_ids=windows, labels=windows).loss)


def relative_distance(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """``‖θ − θ_ref‖ / ‖θ_ref‖`` over all tensors."""
    squares = sum(float((state[n] - t).pow(2).sum()) for n, t in reference.items())
    return (squares / sum(float(t.pow(2).sum()) for t in reference.values())) ** 0.5


def method_options(method: str, plan: SkillPlan) -> dict[str, Any]:
    """Combiner ``method``'s options in this study: its records' defaults at scale 1, with the
    plan's TIES density and DARE drop rate for the combiners that have those options."""
    record = COMBINERS[method]
    studied = {"density": plan.ties_density, "drop_rate": plan.dare_drop_rate, "scale": 1.0}
    given = {k: v for k, v in studied.items() if k in record.defaults}
    return per_model(record, resolve_options(record, given), 1)


def processed(tau: Mapping[str, Tensor], method: str, plan: SkillPlan) -> dict[str, Tensor]:
    """τ as combiner ``method`` uses it, at scale 1: each scales linearly in ``λ`` (DARE with
    a fixed generator), so ``receiver + λ · processed`` is the method's merge at scale ``λ``."""
    record = COMBINERS[method]
    options = method_options(method, plan)
    if record.random:  # one generator for the whole τ, drawn from tensor after tensor
        options["generator"] = torch.Generator().manual_seed(seed_for(plan.seed, "dare"))
    return {name: record.function([t], **options) for name, t in tau.items()}


def _transfer(
    module: nn.Module,
    receiver: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    data: SkillData,
    plan: SkillPlan,
    corpus: str,
) -> dict[str, Any]:
    """``receiver + λ delta`` for every ``λ`` of the plan on the validation additions and the
    own corpus; the ``λ`` of the best validation accuracy (then lower loss) on the test."""

    def load(scale: float) -> nn.Module:
        module.load_state_dict({n: t + scale * delta[n] for n, t in receiver.items()})
        return module

    curve = [
        {
            "scale": scale,
            "val_accuracy": addition_accuracy(load(scale), data.val, plan.digits),
            "own_loss": corpus_loss(module, data.held_out[corpus]),
        }
        for scale in plan.scales
    ]
    best = max(curve, key=lambda point: (point["val_accuracy"], -point["own_loss"]))
    test = addition_accuracy(load(best["scale"]), data.test, plan.digits)
    return {**best, "test_accuracy": test, "curve": curve}


def evaluate_receiver(
    name: str, models: Mapping[str, nn.Module], data: SkillData, plan: SkillPlan
) -> dict[str, Any]:
    """Receiver ``name`` aligned to the base in each way, and every transfer of τ to it."""
    corpus = plan.receivers()[name]
    base, receiver = models["base"], models[name]
    clock = time.perf_counter()
    aligned = {
        "none": receiver,
        "weights": align(receiver, to=base),
        "activations": align(receiver, to=base, data=data.calibration),
    }
    seconds = time.perf_counter() - clock
    base_state = base.state_dict()
    tau = {n: t - base_state[n] for n, t in models["finetuned"].state_dict().items()}
    module, transfers = copy.deepcopy(receiver), []
    for method in METHODS:
        delta = processed(tau, method, plan)
        for kind, model in aligned.items():
            result = _transfer(module, model.state_dict(), delta, data, plan, corpus)
            transfers.append({"method": method, "alignment": kind, **result})
    return {
        "receiver": name,
        "corpus": corpus,
        "val_accuracy": addition_accuracy(receiver, data.val, plan.digits),
        "alignments": {
            kind: {
                "distance_to_base": relative_distance(model.state_dict(), base_state),
                # a symmetry keeps the function: this is the receiver's own loss every time
                "own_loss": corpus_loss(model, data.held_out[corpus]),
            }
            for kind, model in aligned.items()
        },
        "alignment_seconds": seconds,
        "transfers": transfers,
    }


def run_skill(
    plan: SkillPlan,
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``plan``: train or load the models, align, transfer; write ``out/<plan.name>.json``."""
    start = time.perf_counter()
    data = make_data(plan)
    models = trained_models(plan, data, store, progress)
    training = time.perf_counter() - start
    base_state = models["base"].state_dict()
    references = {
        role: {
            "val_accuracy": addition_accuracy(models[role], data.val, plan.digits),
            "test_accuracy": addition_accuracy(models[role], data.test, plan.digits),
            **{f"{c}_loss": corpus_loss(models[role], w) for c, w in data.held_out.items()},
            "distance_to_base": relative_distance(models[role].state_dict(), base_state),
        }
        for role in ("base", "finetuned")
    }
    names = tqdm(plan.receivers(), desc="transfers", disable=not progress, leave=False)
    results = [evaluate_receiver(name, models, data, plan) for name in names]
    total = time.perf_counter() - start
    alignment = sum(r["alignment_seconds"] for r in results)
    document = {
        "benchmark": "skill-transfer",
        "command": plan.command,
        "date": today(),
        "machine": machine_info(),
        "config": asdict(plan),
        "seconds": {
            "training": training,
            "alignment": alignment,
            "evaluation": total - training - alignment,
            "total": total,
        },
        "references": references,
        "results": results,
    }
    write_json(Path(out) / f"{plan.name}.json", document)
    return document


def _cell(transfer: Mapping[str, Any]) -> str:
    return (
        f"{100 * transfer['test_accuracy']:.1f} "
        f"(λ {transfer['scale']:g}; {transfer['own_loss']:.2f})"
    )


def _results_table(results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for result in results:
        cells = {(t["method"], t["alignment"]): _cell(t) for t in result["transfers"]}
        distances = "/".join(f"{a['distance_to_base']:.2f}" for a in result["alignments"].values())
        for i, (method, label) in enumerate(METHODS.items()):
            first = [
                result["receiver"],
                distances,
                f"{result['alignments']['none']['own_loss']:.3f}",
            ]
            rows.append(
                (first if i == 0 else ["", "", ""])
                + [label, *(cells[method, kind] for kind in ALIGNMENTS)]
            )
    headers = ["receiver", "distance to base", "own loss", "method"]
    headers += [f"{label}: test % (λ; own loss)" for label in ALIGNMENTS.values()]
    return format_table(headers, rows, True)


def render_skill(document: Mapping[str, Any]) -> str:
    """The Markdown section of one skill-transfer run: setup, results, what each number means."""
    # imported here, not at the top: markdown.py, which renders every benchmark, imports us
    c, seconds, refs = document["config"], document["seconds"], document["references"]
    spent = (
        f"{seconds['total']:.0f} s (training {seconds['training']:.0f} s, alignment "
        f"{seconds['alignment']:.0f} s, evaluation {seconds['evaluation']:.0f} s)"
    )
    lines = [f"## Skill transfer: `{c['name']}`", "", *run_facts(document, spent)]
    lines += [
        f"- model: `LlamaForCausalLM`, hidden {c['hidden']}, {c['layers']} layers, "
        f"{c['heads']} query heads in {c['kv_heads']} key/value groups, SwiGLU width "
        f"{c['intermediate']}, {len(VOCABULARY)} characters; AdamW, batches of "
        f"{c['batch_size']} windows of {c['block']} tokens",
        f"- base and independent receiver: {c['base_steps']} steps on the general corpus, "
        f"learning rate {c['lr']:g}; fine-tune: {c['skill_steps']} steps on additions of 1 to "
        f"{c['digits']} digits ({100 * c['replay']:g} % general lines mixed in), learning rate "
        f"{c['finetune_lr']:g}; continued receivers: {c['receiver_steps']} steps on the receiver "
        f"corpus at learning rate {c['receiver_lr']:g}, also taken after "
        f"{', '.join(map(str, c['snapshots']))} steps",
        f"- λ chosen from {', '.join(f'{s:g}' for s in c['scales'])} on {c['val_problems']} "
        f"validation additions; test: {c['test_problems']} other additions, none seen in "
        f"training; TIES density {c['ties_density']:g}, DARE drop rate {c['dare_drop_rate']:g}",
        "",
        f"The base answers {100 * refs['base']['test_accuracy']:.1f} % of the test additions, "
        f"the fine-tune {100 * refs['finetuned']['test_accuracy']:.1f} % (general-corpus loss "
        f"{refs['base']['general_loss']:.3f} and {refs['finetuned']['general_loss']:.3f}, "
        f"receiver-corpus loss {refs['base']['receiver_loss']:.3f} and "
        f"{refs['finetuned']['receiver_loss']:.3f}; ‖τ‖ / ‖θ_base‖ = "
        f"{refs['finetuned']['distance_to_base']:.3f}).",
        "",
        "Each cell: exact-match accuracy (%) of greedy answers to the test additions `a+b=` "
        "of the receiver plus λ times τ = θ_fine-tune − θ_base (as the method processes it), "
        "λ chosen on the validation additions, and the mean next-token cross-entropy (nats) "
        f"of that model on {c['eval_windows']} held-out windows of the receiver's own corpus "
        "(the receiver corpus for `continued@k`, the general corpus for `independent`): what "
        "the receiver must keep while it gains the skill. *own loss*: the receiver's own, "
        "before τ. *distance to base*: ‖θ − θ_base‖ / ‖θ_base‖ of the receiver unaligned / "
        "aligned by weights / by activations. Alignment moves the receiver into the base's "
        "coordinates by exact symmetries (`accord.llm.align`; activations: "
        f"{c['calibration_windows']} general-corpus windows), so its own loss does not change. "
        "`continued@k`: the base after k steps on the receiver corpus; *permuted*: that "
        "receiver moved by a random exact symmetry.",
        "",
        _results_table(document["results"]),
    ]
    return "\n".join(lines)
