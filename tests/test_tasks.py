"""Tests of rlhf/tasks.py: the arithmetic generator, its held-out split, the rule-based
reward, the warm-up data, and (slow) a GRPO run that raises the held-out accuracy of a
tiny model first fine-tuned on the warm-up data."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from gpt.sft_data import load_conversations
from rlhf.tasks import (
    SPLITS,
    ArithmeticConfig,
    ArithmeticTask,
    TaskDataConfig,
    arithmetic_reward,
    final_integer,
    is_heldout,
    main,
    sft_conversations,
    split_of,
    write_sft_data,
)

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def solve(question: str) -> int:
    a, op, b = QUESTION.fullmatch(question).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_sample_same_seed_same_problems():
    task = ArithmeticTask(ArithmeticConfig())
    assert task.sample(50, random.Random(3), "rl") == task.sample(50, random.Random(3), "rl")


def test_sample_other_seed_other_problems():
    task = ArithmeticTask(ArithmeticConfig())
    assert task.sample(50, random.Random(3), "rl") != task.sample(50, random.Random(4), "rl")


def test_problems_answers_and_ranges():
    task = ArithmeticTask(ArithmeticConfig(max_operand=12, operations="+-*"))
    problems = task.sample(500, random.Random(0), "rl")
    assert {QUESTION.fullmatch(p.question).group(2) for p in problems} == {"+", "-", "*"}
    for problem in problems:
        a, _, b = QUESTION.fullmatch(problem.question).groups()
        assert 0 <= int(a) <= 12, problem
        assert 0 <= int(b) <= 12, problem
        assert problem.answer == solve(problem.question), problem
        assert problem.answer >= 0, problem


def test_splits_disjoint():
    task = ArithmeticTask(ArithmeticConfig())
    warmup = {p.question for p in task.sample(3000, random.Random(0), "warmup")}
    rl = {p.question for p in task.sample(3000, random.Random(0), "rl")}
    heldout = {p.question for p in task.heldout(1000, seed=0)}
    assert warmup
    assert rl
    assert heldout
    assert not warmup & rl
    assert not warmup & heldout
    assert not rl & heldout
    assert all(split_of(q) == "warmup" for q in warmup)
    assert all(split_of(q) == "rl" for q in rl)
    assert all(is_heldout(q) for q in heldout)


def test_split_shares():
    task = ArithmeticTask(ArithmeticConfig(max_operand=60))
    n = task.cfg.max_operand + 1
    questions = {task.make_problem(a, op, b).question for op in "+-" for a in range(n) for b in range(n)}
    shares = {name: sum(split_of(q) == name for q in questions) / len(questions) for name in SPLITS}
    assert shares["heldout"] == pytest.approx(0.1, abs=0.02)
    assert shares["warmup"] == pytest.approx(0.4, abs=0.03)
    assert shares["rl"] == pytest.approx(0.5, abs=0.03)


def test_heldout_deterministic_distinct():
    task = ArithmeticTask(ArithmeticConfig())
    first = task.heldout(40, seed=5)
    assert first == task.heldout(40, seed=5)
    assert len({p.question for p in first}) == 40


def test_heldout_large_space():
    # 10,000 * 10,000 operand pairs: drawn by rejection instead of listed.
    task = ArithmeticTask(ArithmeticConfig(max_operand=9999))
    problems = task.heldout(30, seed=0)
    assert len({p.question for p in problems}) == 30
    assert all(is_heldout(p.question) for p in problems)


def test_heldout_small_space_returns_all():
    task = ArithmeticTask(ArithmeticConfig(max_operand=3, operations="+"))
    every = [f"What is {a} + {b}?" for a in range(4) for b in range(4)]
    expected = sorted(q for q in every if is_heldout(q))
    assert sorted(p.question for p in task.heldout(1000, seed=0)) == expected


@pytest.mark.parametrize("reply, expected", [
    ("42", 1.0),                      # correct
    (" 42 ", 1.0),                    # whitespace around it
    ("The answer is 42.", 1.0),       # extra text around the final number
    ("17 + 25 = 42", 1.0),            # working shown, correct final number
    ("41", 0.0),                      # wrong
    ("42, no wait, 43", 0.0),         # the last number counts
    ("forty-two", 0.0),               # no number
    ("", 0.0),                        # empty reply
    ("-42", 0.0),                     # the sign is read
])
def test_reward_cases(reply, expected):
    assert arithmetic_reward(reply, 42) == expected


def test_format_reward_for_wrong_number():
    assert arithmetic_reward("41", 42, format_reward=0.25) == 0.25
    assert arithmetic_reward("no idea", 42, format_reward=0.25) == 0.0
    assert arithmetic_reward("42", 42, format_reward=0.25) == 1.0


def test_final_integer():
    assert final_integer("3 apples and 12 pears") == 12
    assert final_integer("minus -7") == -7
    assert final_integer("none") is None


def test_config_problems():
    problems = ArithmeticConfig(max_operand=0, operations="+/", format_reward=1.0).problems()
    assert len(problems) == 3
    with pytest.raises(ValueError, match="operations '/'"):
        ArithmeticTask(ArithmeticConfig(operations="/"))


def test_sft_conversations_correct():
    task = ArithmeticTask(ArithmeticConfig())
    conversations = sft_conversations(task, 100, seed=1)
    assert len(conversations) == 100
    for user, assistant in conversations:
        assert user["role"] == "user"
        assert assistant == {"role": "assistant", "content": str(solve(user["content"]))}
        assert split_of(user["content"]) == "warmup"
    assert conversations == sft_conversations(task, 100, seed=1)


def test_sft_data_loads_for_sft(tmp_path):
    path = write_sft_data(TaskDataConfig(out=str(tmp_path / "arith.jsonl"), n=25, seed=2))
    conversations = load_conversations(str(path))
    assert len(conversations) == 25
    assert conversations == sft_conversations(ArithmeticTask(ArithmeticConfig()), 25, seed=2)


def test_main_writes_file(tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    assert main([f"out={out}", "n=7", "arithmetic.max_operand=5", "arithmetic.operations=+"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7
    assert all(QUESTION.fullmatch(r["messages"][0]["content"]).group(2) == "+" for r in records)
    assert "wrote 7 conversations" in capsys.readouterr().out


def test_main_rejects_bad_field(capsys):
    assert main(["n=zero"]) == 2
    assert "n" in capsys.readouterr().err
