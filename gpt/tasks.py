"""Verifiable tasks for reinforcement learning: problems made by a seeded generator and
replies scored by a rule, so that RL can be watched working without a reward model.

The built-in task is short arithmetic. A problem is rendered as one user message,

    What is 57 + 8?

and the expected reply is the number alone ("65"), as in the warm-up data that
`sft_conversations` writes. The reward (`arithmetic_reward`) is 1.0 when the last
integer in the reply equals the answer, so extra text around it costs nothing,
and `format_reward` (0.0 by default) when the reply has an integer that is wrong.
A reply with no integer gets 0.0.

Every problem belongs to one of three splits for good, chosen by the CRC-32 of its
question (`split_of`): "warmup" (about 40%) for the SFT warm-up data, "rl" (50%) for
the RL prompts and "heldout" (10%) for `task/accuracy`. No two splits share a problem,
whatever the seeds. RL trains on problems the warm-up never showed, so a rising
held-out accuracy measures what RL taught the model about unseen problems, not recall
of memorized answers, which a tiny model falls back on.

The default operands, 0..99 and 0..9, suit a tiny model: it learns a digit table that
all problems share, so its accuracy on unseen problems grows with training. With two
operands of two digits, a 2-layer model of n_embd 64 or 128 in a few minutes of CPU
training mostly memorizes the warm-up problems (above 90% on them, under 25% on unseen
ones), and RL then improves the RL problems without moving held-out accuracy.

Write warm-up data for `gptlab sft` with

    python -m gpt.tasks out=arithmetic_sft.jsonl n=20000

Limits: operands are non-negative integers, subtraction puts the larger operand
first (answers are never negative), and integers are read without thousands
separators or decimals ("1,000" reads as 1 and then 0).
"""

from __future__ import annotations

import json
import random
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.chat import render_prompt, stop_token_ids
from gpt.config import ConfigError, build_config, option
from gpt.config_fields import describe_fields
from gpt.generate import SamplingParams, generate
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

SPLITS = ("warmup", "rl", "heldout")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# Space sizes up to this many problems are listed in full to pick held-out problems.
_ENUMERATE_LIMIT = 200_000
INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One task instance: the user message and the integer answer."""

    question: str
    answer: int


@dataclass
class ArithmeticConfig:
    """Settings of the arithmetic task."""

    max_operand: int = option(99, "the first operand is drawn uniformly from 0..max_operand")
    max_second_operand: int = option(9, "the second operand is drawn uniformly from 0..max_second_operand; 0 for max_operand")
    operations: str = option("+-", "operators to draw from, any of + - * (for example +-)")
    format_reward: float = option(0.0, "reward for a reply whose last integer is wrong (a correct one gets 1.0, a reply without an integer 0.0)")

    def problems(self) -> list[str]:
        found = []
        if not 1 <= self.max_operand <= 9999:
            found.append(f"max_operand must be between 1 and 9999, got {self.max_operand}")
        if not 0 <= self.max_second_operand <= 9999:
            found.append(f"max_second_operand must be between 0 (same as max_operand) and 9999, got {self.max_second_operand}")
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown or not self.operations:
            found.append(f"operations {self.operations!r} must be a non-empty string of the operators "
                         f"{' '.join(OPERATIONS)}, for example +-")
        if not 0.0 <= self.format_reward < 1.0:
            found.append(f"format_reward must be in [0, 1), below the reward of a correct answer, got {self.format_reward}")
        return found


def split_of(question: str) -> str:
    """Return the split of a question from the CRC-32 of its text, so it is the same on every
    run and machine: 10% "heldout", 40% "warmup", 50% "rl"."""
    bucket = zlib.crc32(question.encode("utf-8")) % 10
    if bucket == 0:
        return "heldout"
    return "warmup" if bucket <= 4 else "rl"


def is_heldout(question: str) -> bool:
    return split_of(question) == "heldout"


def final_integer(text: str) -> int | None:
    """Return the last integer written in `text`, or None when there is none."""
    found = INTEGER.findall(text)
    return int(found[-1]) if found else None


def arithmetic_reward(reply: str, answer: int, format_reward: float = 0.0) -> float:
    """Score a reply: 1.0 when its last integer is `answer`, `format_reward` when that
    integer is wrong, 0.0 when the reply has no integer."""
    value = final_integer(reply)
    if value is None:
        return 0.0
    return 1.0 if value == answer else format_reward


class ArithmeticTask:
    """Problems "What is A op B?" with A in 0..max_operand and B in 0..max_second_operand, and their
    rule-based reward."""

    name = "arithmetic"

    def __init__(self, cfg: ArithmeticConfig) -> None:
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid arithmetic task settings: " + "; ".join(problems))
        self.cfg = cfg
        self.operations = sorted(set(cfg.operations), key=cfg.operations.index)
        self.max_second = cfg.max_second_operand or cfg.max_operand
        self.size = (cfg.max_operand + 1) * (self.max_second + 1) * len(self.operations)  # operand draws, not problems
        self._every: list[Problem] | None = None

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        if op == "-" and b > a:
            a, b = b, a  # keeps answers non-negative
        return Problem(f"What is {a} {op} {b}?", OPERATIONS[op](a, b))

    def _draw(self, rng: random.Random) -> Problem:
        a, op, b = rng.randint(0, self.cfg.max_operand), rng.choice(self.operations), rng.randint(0, self.max_second)
        return self.make_problem(a, op, b)

    def every_problem(self) -> list[Problem] | None:
        """Return every distinct problem sorted by question, or None when there are too many to list."""
        if self._every is None and self.size <= _ENUMERATE_LIMIT:
            every = {self.make_problem(a, op, b) for op in self.operations for a in range(self.cfg.max_operand + 1)
                     for b in range(self.max_second + 1)}
            self._every = sorted(every, key=lambda p: p.question)
        return self._every

    def sample(self, n: int, rng: random.Random, split: str) -> list[Problem]:
        """Draw `n` problems of `split` ("warmup" or "rl"), with repeats."""
        if split not in ("warmup", "rl"):
            raise ValueError(f"cannot sample split {split!r}: choose warmup or rl, or use heldout() for held-out problems")
        every = self.every_problem()
        if every is not None and not any(split_of(p.question) == split for p in every):
            raise ValueError(f"the {split} split has no problem among the {len(every)} that max_operand "
                             f"{self.cfg.max_operand}, max_second_operand {self.cfg.max_second_operand} and operations "
                             f"{self.cfg.operations!r} allow; raise max_operand")
        drawn = []
        while len(drawn) < n:
            problem = self._draw(rng)
            if split_of(problem.question) == split:
                drawn.append(problem)
        return drawn

    def heldout(self, n: int, seed: int) -> list[Problem]:
        """Return `n` distinct held-out problems chosen by `seed`, or all of them when there are fewer."""
        rng = random.Random(seed)
        every = self.every_problem()
        if every is not None:
            pool = [p for p in every if is_heldout(p.question)]
            return rng.sample(pool, min(n, len(pool)))
        if n > self.size // 20:
            raise ValueError(f"{n} held-out problems requested, but drawing them at random needs n well below the "
                             f"about {self.size // 10} that exist; request at most {self.size // 20}")
        chosen: dict[str, Problem] = {}
        while len(chosen) < n:
            problem = self._draw(rng)
            if is_heldout(problem.question):
                chosen.setdefault(problem.question, problem)
        return list(chosen.values())

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """Return the chat prompt of a problem: one user message."""
        return [{"role": "user", "content": problem.question}]

    def reward(self, problem: Problem, reply: str) -> float:
        return arithmetic_reward(reply, problem.answer, self.cfg.format_reward)

    def is_correct(self, problem: Problem, reply: str) -> bool:
        return final_integer(reply) == problem.answer


TASKS = {"arithmetic": ArithmeticTask}


def sft_conversations(task: ArithmeticTask, n: int, seed: int) -> list[list[dict[str, str]]]:
    """Draw `n` problems of the warmup split with `seed` and return them as conversations: the
    question, then the answer alone as the assistant's reply."""
    problems = task.sample(n, random.Random(seed), "warmup")
    return [task.messages(p) + [{"role": "assistant", "content": str(p.answer)}] for p in problems]


@torch.no_grad()
def evaluate_accuracy(model: GPT, tokenizer: Tokenizer, task: ArithmeticTask, problems: Sequence[Problem],
                      max_new_tokens: int = 16, batch_size: int = 64,
                      dtype: torch.dtype | None = None) -> dict[str, float]:
    """Answer `problems` with greedy decoding and score the replies.

    Returns:
        {"task/accuracy": share of correct final integers, "task/reward": mean reward}.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    correct, reward = 0, 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [render_prompt(tokenizer, task.messages(p)) for p in chunk]
        for problem, completion in zip(chunk, generate(model, prompts, params, tokenizer=tokenizer, dtype=dtype)):
            correct += task.is_correct(problem, completion.text)
            reward += task.reward(problem, completion.text)
    count = max(len(problems), 1)
    return {"task/accuracy": correct / count, "task/reward": reward / count}


# ---------------------------------------------------------------------------
# Warm-up data on the command line


@dataclass
class TaskDataConfig:
    """Configuration of the warm-up data writer."""

    out: str = option("arithmetic_sft.jsonl", "JSON Lines file to write, one {\"messages\": [...]} conversation per line")
    n: int = option(20000, "number of conversations")
    seed: int = option(0, "seed of the problem draws")
    arithmetic: ArithmeticConfig = option(ArithmeticConfig, "the task's settings; use the same ones for gptlab ppo")

    def problems(self) -> list[str]:
        return [] if self.n >= 1 else [f"n must be at least 1, got {self.n}"]


def write_sft_data(cfg: TaskDataConfig) -> Path:
    """Write warm-up conversations as JSON Lines in the OpenAI messages format that `gptlab sft` reads."""
    conversations = sft_conversations(ArithmeticTask(cfg.arithmetic), cfg.n, cfg.seed)
    path = Path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Write warm-up data from FIELD=VALUE arguments; --help lists the fields."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: python -m gpt.tasks [FIELD=VALUE ...]\n")
        for name, type_text, default, help_text in describe_fields(TaskDataConfig):
            print(f"  {name:<26} {type_text:<6} {default:<22} {help_text}")
        return 0
    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        print(f"error: arguments must be FIELD=VALUE, got {bad}; run with --help to list the fields", file=sys.stderr)
        return 2
    try:
        cfg = build_config(TaskDataConfig, overrides=[tuple(arg.split("=", 1)) for arg in argv])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_sft_data(cfg)
    print(f"wrote {cfg.n} conversations to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
