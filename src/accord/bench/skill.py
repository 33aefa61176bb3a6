"""Skill-transfer benchmark: a task vector added to a receiver that diverged from its base.

Horoi et al. (2025) find that a task vector ``τ = θ_finetuned − θ_base`` transfers a skill
poorly to a *receiver* that trained away from ``θ_base``, and that moving the receiver into the
base's coordinates first (the exact permutation, rotation and scale symmetries of the
transformer, :func:`accord.transformers.align`) recovers much of it. This benchmark builds that
setting at a size that trains on two CPU cores in minutes:

- character-level corpora: *general* string tasks (``c:ab3>ab3`` copy, ``r:`` reverse,
  ``s:`` sort), the *receiver* corpus (``r:``, ``h:`` shift each symbol by one, ``d:`` double
  each symbol) and the *skill*, additions (``123+45=168``, operands of 1 to ``digits`` digits);
- the *base*: a tiny Llama with grouped-query attention trained from scratch on the general
  corpus; the *fine-tune*: the base trained on additions (the loss on the answers only, as the
  operands are random); ``τ`` is their difference;
- two receivers: *continued*, the base trained further on the receiver corpus (same
  initialisation, other data), and *independent*, another random initialisation trained on the
  general corpus (same data, other initialisation: the strongly diverged case);
- for each receiver, alignment (none, weight matching, activation matching on general-corpus
  windows) and method (task arithmetic, TIES, DARE on τ alone): ``receiver + λ τ'`` with ``λ``
  chosen on validation additions by exact-match accuracy of greedy decoding; reported at that
  ``λ``: accuracy on test additions and the loss on held-out text of the receiver's own corpus.

Trained models are cached in the model store (``skill-<role>-<digest>``): reruns only evaluate.
"""

from __future__ import annotations

import copy
import os
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from accord._io import write_json
from accord._table import format_table
from accord.bench._common import machine_info, today
from accord.errors import StoreError
from accord.store import store_entry
from accord.transformers import align, dare, load_checkpoint, save_checkpoint, task_arithmetic, ties

State = dict[str, Tensor]

VOCABULARY = "\n0123456789abcdefghijklmnopqrstuvwxyz:>+="
SYMBOLS = VOCABULARY[1:37]  # the digits and letters the string tasks are made of
_INDEX = {c: i for i, c in enumerate(VOCABULARY)}
TASKS: dict[str, Callable[[str], str]] = {
    "c": lambda s: s,
    "r": lambda s: s[::-1],
    "s": lambda s: "".join(sorted(s)),
    "h": lambda s: "".join(SYMBOLS[(SYMBOLS.index(c) + 1) % len(SYMBOLS)] for c in s),
    "d": lambda s: "".join(c + c for c in s),
}
CORPORA = {"general": "crs", "receiver": "rhd"}  # corpus → its tasks
RECEIVERS = {"continued": "receiver", "independent": "general"}  # receiver → its own corpus
ALIGNMENTS = {
    "none": "unaligned",
    "weights": "aligned by weights",
    "activations": "aligned by activations",
}
METHODS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE"}


@dataclass(frozen=True)
class SkillPlan:
    """Everything one skill-transfer run does; written into its JSON."""

    name: str
    command: str
    base_steps: int
    skill_steps: int
    receiver_steps: int
    digits: int = 3
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    block: int = 32  # tokens per training window
    batch_size: int = 64
    lr: float = 3e-3  # base and independent receiver, trained from scratch
    finetune_lr: float = 1e-3  # fine-tune and continued receiver, trained from the base
    replay: float = 0.5  # fraction of general lines in the fine-tune's corpus
    corpus_lines: int = 50_000
    val_problems: int = 200
    test_problems: int = 500
    eval_windows: int = 128  # held-out windows of each corpus for the losses
    calibration_windows: int = 128  # general-corpus windows for activation alignment
    scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    ties_density: float = 0.2
    dare_drop_rate: float = 0.5
    seed: int = 0


def skill_plan(quick: bool = False) -> SkillPlan:
    """The ``--quick`` plan (2-digit additions, a few minutes on one core) or the default one
    (3-digit additions, about a quarter of an hour)."""
    if quick:
        return SkillPlan(
            name="skill-transfer-quick",
            command="accord bench skill --quick",
            base_steps=600,
            skill_steps=750,
            receiver_steps=400,
            digits=2,
            corpus_lines=20_000,
        )
    return SkillPlan(
        name="skill-transfer",
        command="accord bench skill",
        base_steps=2500,
        skill_steps=2000,
        receiver_steps=1000,
    )


def seed_for(plan_seed: int, use: str) -> int:
    """A seed for one use of randomness: stable across runs, different between uses."""
    return zlib.crc32(f"{plan_seed}/{use}".encode())


def encode(text: str) -> Tensor:
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCABULARY[i] for i in ids)


def general_line(rng: random.Random, tasks: str) -> str:
    """``<task>:<string>><result>``, the task drawn from ``tasks``, the string of 2 to 6
    symbols."""
    task = rng.choice(tasks)
    string = "".join(rng.choices(SYMBOLS, k=rng.randint(2, 6)))
    return f"{task}:{string}>{TASKS[task](string)}\n"


def general_text(seed: int, lines: int, tasks: str) -> str:
    rng = random.Random(seed)
    return "".join(general_line(rng, tasks) for _ in range(lines))


def operand(rng: random.Random, digits: int) -> int:
    """A number of 1 to ``digits`` digits: the digit count uniform, then the value."""
    count = rng.randint(1, digits)
    return rng.randint(0 if count == 1 else 10 ** (count - 1), 10**count - 1)


def addition_problems(seed: int, count: int, digits: int) -> list[tuple[int, int]]:
    """``count`` distinct pairs of :func:`operand`."""
    if count > 10 ** (2 * digits) // 4:  # far fewer than all pairs, or the draw drags on
        raise ValueError(f"{count} distinct problems of {digits} digits; ask for fewer")
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < count:
        pairs[operand(rng, digits), operand(rng, digits)] = None
    return list(pairs)


def skill_text(
    seed: int, lines: int, digits: int, held_out: set[tuple[int, int]], replay: float = 0.0
) -> tuple[str, Tensor]:
    """Lines ``a+b=c`` (no pair of ``held_out``), a fraction ``replay`` of them general-corpus
    lines instead (a fine-tune on a data mix keeps the base's general skills, so τ holds the
    skill rather than the forgetting), and the mask of the characters the loss is taken on:
    each answer with its newline (the operands are random), and the whole of a general line."""
    rng = random.Random(seed)
    parts: list[str] = []
    mask: list[bool] = []
    while len(parts) < lines:
        if rng.random() < replay:
            parts.append(general_line(rng, CORPORA["general"]))
            mask += [True] * len(parts[-1])
            continue
        a, b = operand(rng, digits), operand(rng, digits)
        if (a, b) in held_out:
            continue
        prompt, answer = f"{a}+{b}=", f"{a + b}\n"
        parts.append(prompt + answer)
        mask += [False] * len(prompt) + [True] * len(answer)
    return "".join(parts), torch.tensor(mask)


@dataclass(frozen=True)
class SkillData:
    """Token streams to train on, held-out windows and additions to evaluate on."""

    streams: dict[str, Tensor]  # general, receiver, skill
    answers: Tensor  # the skill stream's answer mask
    held_out: dict[str, Tensor]  # corpus → (windows, block) for the losses
    calibration: list[Tensor]  # general-corpus batches for activation alignment
    val: list[tuple[int, int]]
    test: list[tuple[int, int]]


def _windows(stream: Tensor, block: int, count: int) -> Tensor:
    return stream[: block * count].reshape(count, block)


def make_data(plan: SkillPlan) -> SkillData:
    """Every corpus and problem set of ``plan``, each from its own seed."""
    problems = addition_problems(
        seed_for(plan.seed, "problems"), plan.val_problems + plan.test_problems, plan.digits
    )
    skill, answers = skill_text(
        seed_for(plan.seed, "skill"), plan.corpus_lines, plan.digits, set(problems), plan.replay
    )
    streams = {
        name: encode(general_text(seed_for(plan.seed, name), plan.corpus_lines, tasks))
        for name, tasks in CORPORA.items()
    }
    windows = plan.eval_windows + plan.calibration_windows
    lines = windows * plan.block // 8  # lines are 8 or more characters
    held_out = {
        name: _windows(
            encode(general_text(seed_for(plan.seed, f"{name}-held-out"), lines, tasks)),
            plan.block,
            windows,
        )
        for name, tasks in CORPORA.items()
    }
    return SkillData(
        streams={**streams, "skill": encode(skill)},
        answers=answers,
        held_out={name: w[: plan.eval_windows] for name, w in held_out.items()},
        calibration=list(held_out["general"][plan.eval_windows :].split(16)),
        val=problems[: plan.val_problems],
        test=problems[plan.val_problems :],
    )


def llama(plan: SkillPlan, seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``plan``'s sizes (``seed`` for the
    initialisation)."""
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
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """``model`` trained in place on random windows of ``stream`` (AdamW, learning rate ``lr``
    warmed up linearly over the first 5 % of steps, then decayed linearly to 0); with ``answers``,
    the loss is taken only on the tokens it marks. Returns ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps)
    )
    offsets = torch.arange(plan.block)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        starts = torch.randint(
            0, len(stream) - plan.block, (plan.batch_size, 1), generator=generator
        )
        ids = stream[starts + offsets]
        labels = ids if answers is None else ids.masked_fill(~answers[starts + offsets], -100)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def _keys(plan: SkillPlan) -> dict[str, dict[str, Any]]:
    """The store key of each trained model: everything its weights depend on."""
    common = {
        "sizes": [plan.hidden, plan.layers, plan.heads, plan.kv_heads, plan.intermediate],
        "vocabulary": VOCABULARY,
        "batches": [plan.block, plan.batch_size],
        "corpus_lines": plan.corpus_lines,
        "seed": plan.seed,
    }
    base = {**common, "role": "base", "steps": plan.base_steps, "lr": plan.lr}
    skill = [plan.digits, plan.replay, plan.val_problems, plan.test_problems]
    return {
        "base": base,
        "finetuned": {
            "parent": base,
            "role": "finetuned",
            "steps": plan.skill_steps,
            "lr": plan.finetune_lr,
            "skill": skill,
        },
        "continued": {
            "parent": base,
            "role": "continued",
            "steps": plan.receiver_steps,
            "lr": plan.finetune_lr,
        },
        "independent": {**base, "role": "independent"},
    }


def _cached(
    plan: SkillPlan, store: str | os.PathLike[str], key: dict[str, Any], make: Callable[[], Any]
) -> nn.Module:
    """The model stored under ``key``, or ``make()`` saved there (a checkpoint directory that
    ``accord llm-merge`` reads too)."""
    path = store_entry(store, key, f"skill-{key['role']}")
    if path.exists():
        state, config = load_checkpoint(path)
        if config.get("accord_training") != key:
            raise StoreError(f"{path} was trained with another configuration; delete it to retrain")
        model = llama(plan, 0)
        model.load_state_dict(state)
        return model
    model = make()
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    save_checkpoint(path, model.state_dict(), {**config, "accord_training": key})
    return model


def trained_models(
    plan: SkillPlan, data: SkillData, store: str | os.PathLike[str], progress: bool = True
) -> dict[str, nn.Module]:
    """Base, fine-tune and both receivers, trained or loaded from ``store``."""
    keys = _keys(plan)

    def fit(role: str, start: Callable[[], nn.Module], stream: str, steps: int) -> nn.Module:
        def make() -> nn.Module:
            answers = data.answers if stream == "skill" else None
            key, seed = keys[role], seed_for(plan.seed, f"{role}-batches")
            return train(
                start(),
                data.streams[stream],
                steps,
                key["lr"],
                plan,
                seed,
                answers=answers,
                desc=role,
                progress=progress,
            )

        return _cached(plan, store, keys[role], make)

    def from_base() -> nn.Module:
        return copy.deepcopy(base)

    def fresh(role: str) -> Callable[[], nn.Module]:
        return lambda: llama(plan, seed_for(plan.seed, role))

    base = fit("base", fresh("base"), "general", plan.base_steps)
    return {
        "base": base,
        "finetuned": fit("finetuned", from_base, "skill", plan.skill_steps),
        "continued": fit("continued", from_base, "receiver", plan.receiver_steps),
        "independent": fit("independent", fresh("independent"), "general", plan.base_steps),
    }


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
    """Exact-match accuracy of the greedy answers to ``\\na+b=`` (the newline starts a line as
    in training); an answer must end with a newline within ``digits + 2`` tokens."""
    answers = greedy_answers(model, [f"\n{a}+{b}=" for a, b in problems], digits + 2)
    hits = sum(answer == str(a + b) for answer, (a, b) in zip(answers, problems, strict=True))
    return hits / len(problems)


@torch.no_grad()
def corpus_loss(model: nn.Module, windows: Tensor) -> float:
    """Mean next-token cross-entropy (nats) over ``windows``."""
    return float(model(input_ids=windows, labels=windows).loss)


def _relative_distance(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """``‖θ − θ_ref‖ / ‖θ_ref‖`` over all tensors."""
    squares = sum(float((state[n] - t).pow(2).sum()) for n, t in reference.items())
    return (squares / sum(float(t.pow(2).sum()) for t in reference.values())) ** 0.5


def processed(tau: State, method: str, plan: SkillPlan) -> State:
    """τ as ``method`` uses it, at scale 1: all three scale linearly in ``λ`` (DARE with a
    fixed generator), so ``receiver + λ · processed`` is the method's merge at scale ``λ``."""
    generator = torch.Generator().manual_seed(seed_for(plan.seed, "dare"))
    combine: dict[str, Callable[[Tensor], Tensor]] = {
        "task_arithmetic": lambda t: task_arithmetic([t]),
        "ties": lambda t: ties([t], density=plan.ties_density),
        "dare": lambda t: dare([t], drop_rate=plan.dare_drop_rate, generator=generator),
    }
    return {name: combine[method](t) for name, t in tau.items()}


def _scores(model: nn.Module, data: SkillData, plan: SkillPlan, corpus: str) -> dict[str, float]:
    return {
        "val_accuracy": addition_accuracy(model, data.val, plan.digits),
        "test_accuracy": addition_accuracy(model, data.test, plan.digits),
        "own_loss": corpus_loss(model, data.held_out[corpus]),
    }


def _transfer(
    module: nn.Module, receiver: State, delta: State, data: SkillData, plan: SkillPlan, corpus: str
) -> dict[str, Any]:
    """``receiver + λ delta`` for every ``λ`` of the plan, scored on the validation additions
    and the own corpus; the ``λ`` of the best validation accuracy (then of the lower loss) is
    scored on the test additions."""

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
    name: str,
    models: Mapping[str, nn.Module],
    data: SkillData,
    plan: SkillPlan,
    progress: bool = True,
) -> dict[str, Any]:
    """Reference scores, the alignments of receiver ``name`` to the base, and every transfer
    of τ to it (method × alignment)."""
    corpus = RECEIVERS[name]
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
    module = copy.deepcopy(receiver)
    transfers = []
    for method in tqdm(METHODS, desc=f"transfer to {name}", disable=not progress, leave=False):
        delta = processed(tau, method, plan)
        for kind, model in aligned.items():
            result = _transfer(module, model.state_dict(), delta, data, plan, corpus)
            transfers.append({"method": method, "alignment": kind, **result})
    return {
        "receiver": name,
        "corpus": corpus,
        "models": {
            role: _scores(models[key], data, plan, corpus)
            for role, key in (("base", "base"), ("finetuned", "finetuned"), ("receiver", name))
        },
        "task_vector_norm": _relative_distance(models["finetuned"].state_dict(), base_state),
        "alignments": {
            kind: {
                "distance_to_base": _relative_distance(model.state_dict(), base_state),
                # a symmetry keeps the function: this loss must equal the receiver's own
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
    results = [evaluate_receiver(name, models, data, plan, progress) for name in RECEIVERS]
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
        "results": results,
    }
    write_json(Path(out) / f"{plan.name}.json", document)
    return document


RECEIVER_NOTES = {
    "continued": "the base trained further on the receiver corpus (same initialisation, other "
    "data); its own corpus is the receiver corpus",
    "independent": "another random initialisation trained on the general corpus (same data, "
    "other initialisation); its own corpus is the general corpus",
}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _receiver_table(result: Mapping[str, Any]) -> list[str]:
    models = result["models"]
    rows = [
        [
            label,
            "-",
            _percent(m["val_accuracy"]),
            _percent(m["test_accuracy"]),
            f"{m['own_loss']:.3f}",
        ]
        for label, m in (
            ("base", models["base"]),
            ("fine-tune (base + τ)", models["finetuned"]),
            ("receiver", models["receiver"]),
        )
    ]
    for t in result["transfers"]:
        rows.append(
            [
                f"receiver + λτ: {METHODS[t['method']]}, {ALIGNMENTS[t['alignment']]}",
                f"{t['scale']:g}",
                _percent(t["val_accuracy"]),
                _percent(t["test_accuracy"]),
                f"{t['own_loss']:.3f}",
            ]
        )
    headers = ["model", "λ", "val acc. %", "test acc. %", "own-corpus loss"]
    distances = ", ".join(
        f"{ALIGNMENTS[kind]} {a['distance_to_base']:.3f} (own loss {a['own_loss']:.3f})"
        for kind, a in result["alignments"].items()
    )
    return [
        "",
        f"### Receiver: {result['receiver']}",
        "",
        f"The {result['receiver']} receiver is {RECEIVER_NOTES[result['receiver']]}.",
        "",
        format_table(headers, rows, True),
        "",
        f"Relative distance ‖θ − θ_base‖ / ‖θ_base‖ of the receiver: {distances}; of the "
        f"fine-tune (‖τ‖ / ‖θ_base‖): {result['task_vector_norm']:.3f}. Alignment took "
        f"{result['alignment_seconds']:.1f} s.",
    ]


def render_skill(document: Mapping[str, Any]) -> str:
    """The Markdown section of one skill-transfer run: setup, one table per receiver, and what
    each number means."""
    # imported here: markdown.py, which renders every benchmark, imports this module
    from accord.bench.markdown import _run_facts

    c, seconds = document["config"], document["seconds"]
    spent = (
        f"{seconds['total']:.0f} s (training {seconds['training']:.0f} s, alignment "
        f"{seconds['alignment']:.0f} s, evaluation {seconds['evaluation']:.0f} s)"
    )
    lines = [f"## Skill transfer: `{c['name']}`", "", *_run_facts(document, spent)]
    lines += [
        f"- model: `LlamaForCausalLM`, hidden {c['hidden']}, {c['layers']} layers, "
        f"{c['heads']} query heads in {c['kv_heads']} key/value groups, SwiGLU width "
        f"{c['intermediate']}, {len(VOCABULARY)} characters; AdamW, learning rate {c['lr']}, "
        f"batches of {c['batch_size']} windows of {c['block']} tokens",
        f"- steps: base {c['base_steps']} (general corpus), fine-tune {c['skill_steps']} "
        f"(additions of 1 to {c['digits']} digits), continued receiver {c['receiver_steps']} "
        f"(receiver corpus), independent receiver {c['base_steps']} (general corpus)",
        f"- λ chosen from {', '.join(f'{s:g}' for s in c['scales'])} on {c['val_problems']} "
        f"validation additions; test: {c['test_problems']} other additions, none seen in "
        f"training; TIES density {c['ties_density']}, DARE drop rate {c['dare_drop_rate']}",
        "",
        "τ = θ_fine-tune − θ_base. *acc.*: exact-match accuracy of greedy answers to `a+b=`. "
        "*own-corpus loss*: the mean next-token cross-entropy (nats) of the model on "
        f"{c['eval_windows']} held-out windows of the receiver's own training corpus: what the "
        "receiver must keep while it gains the skill. *aligned*: the receiver moved into the "
        "base's coordinates by the exact transformer symmetries (`accord.transformers.align`, "
        "from the weights or from activations on general-corpus windows) before τ is added; "
        "the aligned receiver alone computes the receiver's function (same own-corpus loss).",
    ]
    for result in document["results"]:
        lines += _receiver_table(result)
    return "\n".join(lines)
