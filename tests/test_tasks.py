"""Tests of gpt/tasks.py: the arithmetic generator, its three splits, the rule-based
reward, the warm-up data, and (slow) a PPO run that raises the held-out accuracy of a
tiny model first fine-tuned on the warm-up data."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_model
from gpt.model import GPT, ModelConfig
from gpt.sft_data import load_conversations
from gpt.tokenizer import Tokenizer
from gptlab.cli import main as gptlab
import gpt.tasks
from gpt.tasks import (
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


def test_sample_rejects_heldout_split():
    task = ArithmeticTask(ArithmeticConfig())
    with pytest.raises(ValueError, match="cannot sample split 'heldout'"):
        task.sample(5, random.Random(0), "heldout")


def test_sample_empty_split(monkeypatch):
    # No small space leaves a split empty under the real hash, so every question is sent to heldout.
    monkeypatch.setattr(gpt.tasks, "split_of", lambda question: "heldout")
    task = ArithmeticTask(ArithmeticConfig(max_operand=1, max_second_operand=0, operations="+"))
    with pytest.raises(ValueError, match="the rl split has no problem among the 4"):
        task.sample(1, random.Random(0), "rl")


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


def test_second_operand_range():
    task = ArithmeticTask(ArithmeticConfig(max_operand=99, max_second_operand=3, operations="+"))
    problems = task.sample(300, random.Random(0), "rl")
    assert max(int(QUESTION.fullmatch(p.question).group(3)) for p in problems) == 3
    assert max(int(QUESTION.fullmatch(p.question).group(1)) for p in problems) > 50


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
    # 10,000 * 10,000 operand pairs (max_second_operand 0 means the same range): drawn by rejection.
    task = ArithmeticTask(ArithmeticConfig(max_operand=9999, max_second_operand=0))
    problems = task.heldout(30, seed=0)
    assert len({p.question for p in problems}) == 30
    assert all(is_heldout(p.question) for p in problems)


def test_heldout_small_space_returns_all():
    task = ArithmeticTask(ArithmeticConfig(max_operand=3, max_second_operand=0, operations="+"))
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
    problems = ArithmeticConfig(max_operand=0, max_second_operand=-1, operations="+/", format_reward=1.0).problems()
    assert len(problems) == 4
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


@pytest.mark.slow
def test_rl_raises_heldout_accuracy(tmp_path):
    """Warm up a tiny random GPT on the task with gptlab sft, then run gptlab ppo on the task:
    the greedy accuracy on held-out problems rises. About 3 minutes on two CPU cores."""
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    if not data_dir:
        pytest.skip("GPTLAB_DATA_DIR is not set; point it at the data kit to train the test tokenizer on real text")
    text = gzip.open(Path(data_dir) / "pretrain" / "tinystories" / "tinystories_train_prefix.txt.gz", "rt").read()
    tokenizer_file = tmp_path / "tokenizer.json"
    Tokenizer.train(text.split("\n\n")[:600], vocab_size=512).save(tokenizer_file)
    torch.manual_seed(0)
    config = ModelConfig.from_layout("gpt2", vocab_size=Tokenizer.from_file(tokenizer_file).vocab_size, n_layer=2,
                                     n_head=4, n_embd=64, block_size=64)
    save_model(GPT(config), tmp_path / "base", tokenizer_file=tokenizer_file)
    write_sft_data(TaskDataConfig(out=str(tmp_path / "warmup.jsonl"), n=20000, seed=0))

    assert gptlab(["sft", f"base={tmp_path / 'base'}", f"data={tmp_path / 'warmup.jsonl'}", f"out_dir={tmp_path / 'sft'}",
                   "train.max_steps=1200", "train.batch_size=16", "train.lr=3e-3", "train.dtype=float32",
                   "train.eval_interval=0", "train.checkpoint_interval=100000", "eval_tokens=0"]) == 0
    assert gptlab(["ppo", "--policy", str(tmp_path / "sft"), "--task", "arithmetic", "--out_dir", str(tmp_path / "ppo"),
                   "--prompts_per_step", "256", "--max_new_tokens", "6", "--eval_prompts", "200",
                   "--train.max_steps", "100", "--train.batch_size", "128", "--train.lr", "5e-5",
                   "--train.eval_interval", "0"]) == 0

    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    before, after = summary["before"]["task/accuracy"], summary["after"]["task/accuracy"]
    assert before > 0.2  # the warm-up taught the format and some arithmetic
    assert after >= before + 0.03, (before, after)
