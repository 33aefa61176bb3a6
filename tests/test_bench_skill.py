"""The skill-transfer benchmark: its corpora, its scoring, and a micro run end to end."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from accord.bench import add_bench_parser, skill
from accord.bench import skill_corpus as corpus
from accord.errors import StoreError
from accord.llm import dare, ties

MICRO = replace(
    skill.skill_plan(quick=True),
    name="skill-micro",
    command="pytest",
    base_steps=3,
    skill_steps=3,
    receiver_steps=3,
    snapshots=(1,),
    hidden=16,
    intermediate=32,
    layers=2,
    corpus_lines=300,
    val_problems=10,
    test_problems=20,
    eval_windows=8,
    calibration_windows=8,
    scales=(0.5, 1.0),
)


def test_addition_lines_are_correct_sums_with_only_the_answers_masked() -> None:
    held_out = set(corpus.addition_problems(0, 50, 3))
    text, mask = corpus.skill_text(1, 400, 3, held_out)
    assert len(mask) == len(text)
    lines = text.split("\n")[:-1]
    assert len(lines) == 400
    position = 0
    for line in lines:
        prompt, answer = line.split("=")
        a, b = (int(x) for x in prompt.split("+"))
        assert int(answer) == a + b and (a, b) not in held_out
        assert max(a, b) < 1000 and str(a) == prompt.split("+")[0]  # no leading zeros
        span = mask[position : position + len(line) + 1].tolist()
        assert span == [False] * (len(prompt) + 1) + [True] * (len(answer) + 1)
        position += len(line) + 1


def test_replayed_general_lines_are_learned_whole() -> None:
    text, mask = corpus.skill_text(1, 400, 2, set(), replay=0.5)
    lines = text.split("\n")[:-1]
    general = [line for line in lines if ":" in line]
    assert 150 < len(general) < 250 and all(line[0] in "crs" for line in general)
    assert int(mask.sum()) == sum(
        len(line) + 1 if ":" in line else len(line.split("=")[1]) + 1 for line in lines
    )


def test_problems_are_distinct_and_cover_every_digit_count() -> None:
    problems = corpus.addition_problems(3, 300, 3)
    assert len(set(problems)) == 300
    assert {len(str(a)) for a, _ in problems} == {1, 2, 3}
    with pytest.raises(ValueError, match="fewer"):
        corpus.addition_problems(0, 30, 1)


def test_general_lines_apply_their_task() -> None:
    expected = {"r": "3cba", "s": "3abc", "h": "bcd4", "d": "aabbcc33"}
    for task, result in expected.items():
        assert corpus.TASKS[task]("abc3") == result
    assert corpus.TASKS["h"]("z9") == "0a"  # the shift wraps around the symbols
    for line in corpus.general_text(2, 200, "rhd").splitlines():
        task, rest = line.split(":")
        string, result = rest.split(">")
        assert task in "rhd" and 2 <= len(string) <= 6
        assert result == corpus.TASKS[task](string)


class Oracle:
    """Next-token logits of a model answering every ``a+b=`` with ``answer(a, b)``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(corpus.VOCABULARY))
        for row, ids in enumerate(input_ids.tolist()):
            prompt, written = corpus.decode(ids).split("\n")[1].split("=")
            a, b = (int(x) for x in prompt.split("+"))
            target = f"{self.answer(a, b)}\n"
            following = target[len(written)] if len(written) < len(target) else "\n"
            logits[row, -1, corpus.VOCABULARY.index(following)] = 1.0
        return SimpleNamespace(logits=logits)


def test_accuracy_of_oracles_is_exact() -> None:
    problems = corpus.addition_problems(4, 40, 3)
    assert skill.addition_accuracy(Oracle(lambda a, b: a + b), problems, 3) == 1.0
    assert skill.addition_accuracy(Oracle(lambda a, b: a + b + 1), problems, 3) == 0.0
    # right for exactly the problems whose first operand is even
    half = skill.addition_accuracy(Oracle(lambda a, b: a + b + a % 2), problems, 3)
    assert half == sum(a % 2 == 0 for a, _ in problems) / len(problems)
    # digits without the closing newline within digits + 2 tokens do not count
    assert skill.addition_accuracy(Oracle(lambda a, b: f"{a + b}00000"), problems, 3) == 0.0


def test_sparse_methods_scale_linearly_as_the_lambda_search_assumes() -> None:
    tau = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    twice = {m: skill.processed(tau, m, MICRO)["w"] * 2 for m in skill.METHODS}
    torch.testing.assert_close(twice["task_arithmetic"], 2 * tau["w"])
    torch.testing.assert_close(twice["ties"], ties([tau["w"]], density=0.2, scale=2))
    generator = torch.Generator().manual_seed(skill.seed_for(MICRO.seed, "dare"))
    torch.testing.assert_close(
        twice["dare"], dare([tau["w"]], drop_rate=0.5, generator=generator, scale=2)
    )


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("skill")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster without thread hand-offs
    try:
        skill.run_skill(MICRO, root / "store", root / "results", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root, json.loads((root / "results" / "skill-micro.json").read_text())


def test_micro_run_writes_every_result(micro: tuple[Path, dict[str, Any]]) -> None:
    _, document = micro
    assert {"command", "date", "machine", "config", "seconds", "references", "results"} <= set(
        document
    )
    assert document["config"]["base_steps"] == 3 and document["config"]["scales"] == [0.5, 1.0]
    assert set(document["references"]) == {"base", "finetuned"}
    assert document["references"]["base"]["distance_to_base"] == 0.0
    receivers = [r["receiver"] for r in document["results"]]
    assert receivers == ["continued@1", "continued@3", "continued@1 permuted", "independent"]
    for result in document["results"]:
        pairs = {(t["method"], t["alignment"]) for t in result["transfers"]}
        assert pairs == {(m, a) for m in skill.METHODS for a in skill.ALIGNMENTS}
        for transfer in result["transfers"]:
            assert transfer["scale"] in (0.5, 1.0) and len(transfer["curve"]) == 2
            assert 0 <= transfer["test_accuracy"] <= 1
        # alignment is an exact symmetry: the receiver's own loss does not move
        own = result["alignments"]["none"]["own_loss"]
        for alignment in result["alignments"].values():
            assert alignment["own_loss"] == pytest.approx(own, abs=1e-4)
    first, last, permuted, independent = (
        {k: a["distance_to_base"] for k, a in r["alignments"].items()} for r in document["results"]
    )
    # one step from the base, then three: the continued receivers drift away
    assert 0 < first["none"] < last["none"] < independent["none"]
    # the permuted copy is far until weight matching moves it back onto the unpermuted one
    assert permuted["none"] > 5 * first["none"]
    assert permuted["weights"] == pytest.approx(first["weights"], abs=1e-3)


def test_models_are_reused_from_the_store(
    micro: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    root, document = micro
    names = sorted(p.name for p in (root / "store").iterdir())
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "skill-base",
        "skill-continued",
        "skill-continued",
        "skill-finetuned",
        "skill-independent",
    ]
    monkeypatch.setattr(skill, "train", lambda *args, **kwargs: pytest.fail("retrained"))
    again = skill.run_skill(MICRO, root / "store", root / "again", progress=False)
    assert again["references"] == document["references"]
    assert sorted(p.name for p in (root / "store").iterdir()) == names


def test_a_store_entry_trained_otherwise_is_refused(
    micro: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = micro
    store = shutil.copytree(root / "store", tmp_path / "store")
    [base] = store.glob("skill-base-*")
    config = json.loads((base / "config.json").read_text())
    config["accord_training"]["steps"] += 1
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreError, match="another configuration"):
        skill.trained_models(MICRO, skill.make_data(MICRO), store, progress=False)


def test_render_skill_tabulates_every_transfer(micro: tuple[Path, dict[str, Any]]) -> None:
    _, document = micro
    text = skill.render_skill(document)
    assert text.startswith("## Skill transfer: `skill-micro`")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(document["results"]) * len(skill.METHODS)
    transfer = document["results"][-1]["transfers"][-1]  # DARE on the activation-aligned
    assert (
        table[-1]
        .rstrip("| ")
        .endswith(
            f"{100 * transfer['test_accuracy']:.1f} (λ {transfer['scale']:g}; "
            f"{transfer['own_loss']:.2f})"
        )
    )


def test_cli_registers_skill() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "skill", "--quick", "--store", "s", "--out", "o", "--quiet"])
    assert (args.quick, args.store, args.out, args.quiet) == (True, "s", "o", True)
    assert args.func.__name__ == "_cmd_skill"
