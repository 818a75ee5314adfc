"""Rollouts and updates of PPO and GRPO (`gptlab ppo`, configured by `rlhf.ppo.PPOConfig`).

A rollout samples replies to prompts with the shared generation engine, scores them
(a reward model or a task's rule), and recomputes the log-probabilities of the policy
and the reference in one forward pass at the sampling temperature. An update runs
ppo_epochs passes over the rollout in minibatches, one optimizer step each.

Under torchrun each process samples replies to its own share of the step's prompts.
Generation and the rollout's forward passes run on the unwrapped policy, without
gradient sync. The update runs through the DistributedDataParallel wrapper, so the
processes average their gradients. The rollout statistics, the whitening of PPO's
advantages and the update's normalizers are reduced over the processes, so they equal
those of one process with the whole rollout. A GRPO group never spans processes,
because prompts are split before their replies are sampled.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gpt import distributed
from gpt.chat import END_OF_TURN, render_prompt, stop_token_ids
from gpt.device import autocast
from gpt.generate import Completion, SamplingParams, generate
from gpt.sft_data import load_mix
from gpt.tasks import Problem
from gpt.tokenizer import Tokenizer
from rlhf.advantages import clipped_surrogate, clipped_value_loss, gae, group_advantages, k3_kl, whiten
from rlhf.losses import unwrap_gpt

if TYPE_CHECKING:  # the config's module imports this one
    from rlhf.ppo import PPOConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The policy and its log-probabilities


class PolicyWithValueHead(nn.Module):
    """The policy (a GPT, or a PeftModel around one) and, for PPO, a value head on its hidden states."""

    def __init__(self, policy: nn.Module, value_head: bool) -> None:
        super().__init__()
        self.policy = policy
        n_embd = self.gpt.config.n_embd
        self.value_head = nn.Linear(n_embd, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)  # values start at 0, a neutral baseline
            nn.init.zeros_(self.value_head.bias)

    @property
    def gpt(self) -> nn.Module:
        """The GPT to run: with LoRA, the base model whose layers carry the adapters."""
        return unwrap_gpt(self.policy)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float,
                vocab_limit: int) -> ReplyOutput:
        """Run `reply_forward` with the policy and the value head: the call that DistributedDataParallel wraps."""
        return reply_forward(self.gpt, input_ids, attention_mask, prompt_width, temperature, vocab_limit,
                             self.value_head)


class ReplyOutput(NamedTuple):
    logprobs: torch.Tensor  # (B, R) log-probability of each reply token at the temperature
    entropy: torch.Tensor  # (B, R) entropy of the sampling distribution before each token
    values: torch.Tensor | None  # (B, R) value of the state before each token


def reply_forward(gpt: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                  temperature: float, vocab_limit: int, value_head: nn.Module | None = None) -> ReplyOutput:
    """Run the model on (B, P + R) rows, prompts left-padded to P columns and replies right-padded
    after them, and return what each of the R reply tokens needs.

    The logits are divided by the temperature and ids from `vocab_limit` on are excluded,
    as `gpt.generate` does when sampling, so these are the sampler's log-probabilities.
    """
    out = gpt(input_ids, attention_mask=attention_mask, return_hidden=True, compute_logits=False)
    hidden = out.hidden[:, prompt_width - 1:-1]  # (B, R, C): the states that predict the reply tokens
    logits = unwrap_gpt(gpt).lm_head(hidden).float() / temperature  # (B, R, V)
    if vocab_limit < logits.size(-1):
        logits[..., vocab_limit:] = float("-inf")
    logp = F.log_softmax(logits, dim=-1)
    tokens = input_ids[:, prompt_width:]
    logprobs = logp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return ReplyOutput(logprobs, entropy, values)


# ---------------------------------------------------------------------------
# Prompts and scores


@dataclass
class Prompt:
    ids: list[int]
    problem: Problem | None = None  # the task instance behind the prompt, for rule-based rewards


Scorer = Callable[[list[Prompt], list[Completion]], torch.Tensor]


class TaskPrompts:
    """Prompts of a built-in task: fresh problems of its "rl" split each step, fixed held-out problems."""

    def __init__(self, task, tokenizer: Tokenizer, eval_size: int, seed: int, max_prompt_tokens: int) -> None:
        self.task, self.tokenizer, self.max_prompt_tokens = task, tokenizer, max_prompt_tokens
        self.heldout = [self._prompt(p) for p in task.heldout(eval_size, seed)]

    def _prompt(self, problem: Problem) -> Prompt:
        ids = render_prompt(self.tokenizer, self.task.messages(problem))
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"the {self.task.name} prompt {problem.question!r} has {len(ids)} tokens, but block_size "
                             f"minus max_new_tokens leaves room for {self.max_prompt_tokens}; lower max_new_tokens")
        return Prompt(ids, problem)

    def sample(self, n: int, seed: int) -> list[Prompt]:
        return [self._prompt(p) for p in self.task.sample(n, random.Random(seed), "rl")]


class DataPrompts:
    """Prompts from chat data: each conversation up to its last assistant reply, rendered for generation.

    Prompts longer than `max_prompt_tokens` are dropped; `eval_size` of the rest, chosen by
    `seed`, are held out.
    """

    def __init__(self, cfg: PPOConfig, tokenizer: Tokenizer, max_prompt_tokens: int) -> None:
        conversations = load_mix(cfg.prompts, seed=cfg.train.seed, max_examples=cfg.max_prompts)
        prompts, too_long = [], 0
        for conversation in conversations:
            last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
            if not any(m["role"] == "user" for m in conversation[:last]):
                continue  # no user message to reply to
            ids = render_prompt(tokenizer, conversation[:last])
            if len(ids) > max_prompt_tokens:
                too_long += 1
            else:
                prompts.append(Prompt(ids))
        random.Random(cfg.train.seed).shuffle(prompts)
        self.heldout, self.train = prompts[:cfg.eval_prompts], prompts[cfg.eval_prompts:]
        logger.info("prompts: %s from %s, %s dropped as longer than %d tokens; %s held out", f"{len(prompts):,}",
                    cfg.prompts, f"{too_long:,}", max_prompt_tokens, f"{len(self.heldout):,}")
        if not self.train:
            raise ValueError(f"no training prompts left from {cfg.prompts!r}: {len(prompts)} fit in {max_prompt_tokens} "
                             f"tokens and {len(self.heldout)} are held out; lower max_new_tokens or eval_prompts, or "
                             f"choose other prompts")

    def sample(self, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed)
        return rng.sample(self.train, n) if n <= len(self.train) else rng.choices(self.train, k=n)


def task_scorer(task) -> Scorer:
    def score(prompts: list[Prompt], completions: list[Completion]) -> torch.Tensor:
        return torch.tensor([task.reward(p.problem, c.text) for p, c in zip(prompts, completions)])
    return score


def reward_model_scorer(reward_model: nn.Module, tokenizer: Tokenizer) -> Scorer:
    """Score each reply as the chat template renders it: the prompt, then the reply closed by
    <|end|> in place of the stop token it ended with. A reply cut at max_new_tokens stays
    open, like the cut replies the reward model was trained on."""
    end = tokenizer.special_id(END_OF_TURN)

    def score(prompts: list[Prompt], completions: list[Completion]) -> torch.Tensor:
        rows = []
        for prompt, completion in zip(prompts, completions):
            if completion.finish_reason == "stop":
                rows.append(prompt.ids + completion.tokens[:-1] + [end])
            else:
                rows.append(prompt.ids + completion.tokens)
        return reward_model.score(rows)
    return score


# ---------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """Replies to a batch of prompts and everything the update epochs need; (N, R) tensors are
    per reply token, 0 on padding."""

    input_ids: torch.Tensor  # (N, P + R)
    attention_mask: torch.Tensor  # (N, P + R)
    prompt_width: int  # P
    mask: torch.Tensor  # (N, R) float, 1 on reply tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None  # ppo only
    returns: torch.Tensor | None
    scores: torch.Tensor  # (N,)
    kl_coef: float  # the KL coefficient the rollout was collected with
    stats: dict[str, float]


def pad_rows(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Left-pad prompts to P columns and right-pad replies to R after them.

    Returns:
        input_ids (N, P + R), attention_mask (N, P + R), reply mask (N, R) float, and P.
    """
    P, R = max(map(len, prompts)), max(map(len, replies))
    N = len(prompts)
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(N, P + R, dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[i, P:P + len(reply)] = torch.tensor(reply)
        attention_mask[i, P - len(prompt):P + len(reply)] = 1
    return input_ids, attention_mask, attention_mask[:, P:].float(), P


@torch.no_grad()
def rollout_forward(model: PolicyWithValueHead, reference: nn.Module | None, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, P: int, cfg: PPOConfig, vocab_limit: int,
                    dtype: torch.dtype) -> tuple[ReplyOutput, torch.Tensor]:
    """Log-probabilities, entropy and values of the policy, and the reference's log-probabilities,
    in chunks of train.batch_size rows. `reference` None means the policy with its LoRA adapters off."""
    device = input_ids.device
    parts, ref_parts = [], []
    for rows in torch.arange(len(input_ids)).split(cfg.train.batch_size):
        ids, mask = input_ids[rows], attention_mask[rows]
        with autocast(device, dtype):
            parts.append(reply_forward(model.gpt, ids, mask, P, cfg.temperature, vocab_limit, model.value_head))
            if reference is not None:
                ref_parts.append(reply_forward(reference, ids, mask, P, cfg.temperature, vocab_limit).logprobs)
            else:
                with model.policy.disable_adapter():
                    ref_parts.append(reply_forward(model.gpt, ids, mask, P, cfg.temperature, vocab_limit).logprobs)
    values = torch.cat([p.values for p in parts]) if model.value_head is not None else None
    out = ReplyOutput(torch.cat([p.logprobs for p in parts]), torch.cat([p.entropy for p in parts]), values)
    return out, torch.cat(ref_parts)


def collect_rollout(model: PolicyWithValueHead, reference: nn.Module | None, tokenizer: Tokenizer,
                    prompts: list[Prompt], scorer: Scorer, kl_coef: float, cfg: PPOConfig, seed: int,
                    dtype: torch.dtype = torch.float32) -> Rollout:
    """Sample replies to `prompts` (each repeated samples_per_prompt times), score them, and
    compute log-probabilities, rewards and advantages.

    Under torchrun every process calls it with its own prompts and seed, and `model` is the
    unwrapped policy. Its statistics are means over the replies of every process, so
    that all processes log the same values and adapt the KL coefficient alike.
    """
    device = next(model.parameters()).device
    G = cfg.samples_per_prompt
    prompts = [p for p in prompts for _ in range(G)]  # a group's replies sit in consecutive rows
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop_token_ids=stop_token_ids(tokenizer), seed=seed)
    model.eval()
    completions = generate(model.gpt, [p.ids for p in prompts], params, tokenizer=tokenizer, dtype=dtype)
    input_ids, attention_mask, mask, P = pad_rows([p.ids for p in prompts], [c.tokens for c in completions],
                                                  tokenizer.pad_id)
    input_ids, attention_mask, mask = input_ids.to(device), attention_mask.to(device), mask.to(device)
    vocab_limit = min(model.gpt.config.vocab_size, tokenizer.vocab_size)
    out, ref_logprobs = rollout_forward(model, reference, input_ids, attention_mask, P, cfg, vocab_limit, dtype)

    scores = scorer(prompts, completions).float().to(device)
    unfinished = torch.tensor([c.finish_reason != "stop" for c in completions], device=device)
    scores = scores - cfg.unfinished_penalty * unfinished.float()
    kl = (out.logprobs - ref_logprobs) * mask  # (N, R), the k1 estimate of each token's KL
    lengths = mask.sum(-1).long()
    if cfg.algorithm == "ppo":
        rewards = -kl_coef * kl
        rewards[torch.arange(len(lengths), device=device), lengths - 1] += scores
        advantages, returns = gae(rewards, out.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
    else:
        advantages, returns = group_advantages(scores, G)[:, None] * mask, None
    sums = [scores.sum(), kl.sum(), (out.entropy * mask).sum(), mask.sum(), lengths.sum(), (~unfinished).sum(),
            torch.tensor(len(scores), device=device)]
    totals = torch.stack([value.double() for value in sums])
    score, kl_sum, entropy, tokens, length, stopped, replies = distributed.all_reduce_sum(totals).tolist()
    stats = {"objective/reward": score / replies, "objective/kl": kl_sum / replies, "objective/kl_coef": kl_coef,
             "policy/entropy": entropy / max(tokens, 1), "reply/length": length / replies,
             "reply/stopped": stopped / replies}
    return Rollout(input_ids, attention_mask, P, mask, out.logprobs, ref_logprobs, advantages, out.values, returns,
                   scores, kl_coef, stats)


# ---------------------------------------------------------------------------
# The update


def chunk_loss(model: nn.Module, rollout: Rollout, rows: torch.Tensor, cfg: PPOConfig, vocab_limit: int,
               normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the loss of some rows of a minibatch, divided by `normalizer` (see
    `minibatch_normalizer`), and sums of per-token statistics.

    `model` is a PolicyWithValueHead, or the DistributedDataParallel wrapper around one.
    """
    mask = rollout.mask[rows]
    out = model(rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_width, cfg.temperature,
                vocab_limit)
    old_logprobs = rollout.logprobs[rows]
    per_token, clipped = clipped_surrogate(out.logprobs, old_logprobs, rollout.advantages[rows], cfg.clip_eps)
    sums = {"clipped": (clipped * mask).sum().item(), "tokens": mask.sum().item(),
            "approxkl": (0.5 * (out.logprobs - old_logprobs).detach() ** 2 * mask).sum().item()}
    if cfg.algorithm == "grpo":
        per_token = per_token + rollout.kl_coef * k3_kl(out.logprobs, rollout.ref_logprobs[rows])
        policy_loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
        sums["policy_loss"] = policy_loss.item()
        return policy_loss, sums
    policy_loss = (per_token * mask).sum() / normalizer
    value_losses, value_clipped = clipped_value_loss(out.values, rollout.values[rows], rollout.returns[rows],
                                                     cfg.value_clip)
    value_loss = (value_losses * mask).sum() / normalizer
    sums.update(policy_loss=policy_loss.item(), value_loss=value_loss.item(),
                value_clipped=(value_clipped * mask).sum().item())
    return policy_loss + cfg.vf_coef * value_loss, sums


def minibatch_normalizer(rollout: Rollout, rows: torch.Tensor, cfg: PPOConfig) -> float:
    """Return the divisor of this process's loss sums for the minibatch `rows` of its rollout.

    The loss is a mean over the reply tokens (ppo) or the replies (grpo) of the minibatch
    over every process. DistributedDataParallel averages the gradients over the processes,
    so each process divides its sums by that global count over the number of processes.
    Every process has as many replies, so for grpo that is its own number of rows.
    """
    if cfg.algorithm == "grpo":
        return float(len(rows))
    tokens = distributed.all_reduce_sum(rollout.mask[rows].sum())
    return tokens.clamp(min=1).item() / distributed.world_size()


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one backward pass: DistributedDataParallel all-reduces the gradients only when `enabled`."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def update(model: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, cfg: PPOConfig,
           vocab_limit: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Run ppo_epochs passes over the rollout in shuffled minibatches, one optimizer step each.

    A minibatch contains train.batch_size * train.grad_accum replies over all processes, and
    each process runs its share in chunks of train.batch_size rows.

    Args:
        model: a PolicyWithValueHead, or under torchrun the DistributedDataParallel wrapper around one.

    Returns:
        policy/clipfrac, policy/approxkl, loss/policy and, for ppo, loss/value and value/clipfrac,
        averaged over every minibatch of every epoch and over every process.
    """
    device = rollout.input_ids.device
    N = len(rollout.input_ids)
    world_size = distributed.world_size()
    minibatch = cfg.train.batch_size * cfg.train.grad_accum // world_size
    totals: dict[str, float] = {}
    n_steps = 0
    model.eval()  # no dropout: the probability ratio must compare one deterministic function
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, minibatch):
            rows = order[start:start + minibatch].to(device)
            normalizer = minibatch_normalizer(rollout, rows, cfg)
            chunks = rows.split(cfg.train.batch_size)
            for index, chunk in enumerate(chunks):
                with gradient_sync(model, index == len(chunks) - 1):
                    with autocast(device, dtype):
                        loss, sums = chunk_loss(model, rollout, chunk, cfg, vocab_limit, normalizer)
                    loss.backward()
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_steps += 1
    totals = distributed.all_reduce_sums(totals, device)
    tokens = max(totals["tokens"], 1.0)
    # Each process's loss sums were divided by a normalizer world_size times too small (see
    # minibatch_normalizer), so their sum over processes is world_size times the mean loss.
    losses = n_steps * world_size
    stats = {"policy/clipfrac": totals["clipped"] / tokens, "policy/approxkl": totals["approxkl"] / tokens,
             "loss/policy": totals["policy_loss"] / losses}
    if cfg.algorithm == "ppo":
        stats.update({"loss/value": totals["value_loss"] / losses, "value/clipfrac": totals["value_clipped"] / tokens})
    return stats
