"""Reinforcement learning from a reward (`gptlab ppo`): PPO with a value head, or GRPO.

    gptlab ppo --policy runs/NAME/sft --reward runs/NAME/reward      # -> runs/NAME/ppo
    gptlab ppo --policy runs/NAME/sft --task arithmetic --algorithm grpo

Each step samples replies to a batch of prompts with the shared generation engine
(`gpt.generate`), by pure sampling at `temperature` (no top-k, top-p or repetition
penalty), so the sampling distribution is softmax(logits / temperature). The
log-probabilities used in training are recomputed with one forward pass at that
temperature, and a test checks that they equal the sampler's. A reply is scored once
at its end: by the reward model (`rlhf.reward`), on the conversation as the chat
template renders it, or by the rule of a built-in task (`gpt.tasks`). The
reference is the frozen starting policy; with LoRA it is the policy with its adapters
disabled, so no second copy is kept.

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, with the
per-token KL penalty of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"): the reward of reply token t is -kl_coef * (log pi(y_t) - log
pi_ref(y_t)), plus the score on the last token. Advantages come from GAE (Schulman et
al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16) over the reply tokens only: the end of a reply is terminal, and
padding after it gets no advantage and no value loss. The value head is
nn.Linear(n_embd, 1) on the policy's final hidden states, so policy and critic share
the trunk and the value loss (weighted by vf_coef) also trains it. Value predictions
are clipped around the rollout's values, as OpenAI baselines' ppo2 does. kl_coef is
fixed, or adapted toward kl_target by Ziegler et al.'s proportional controller.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples group_size replies
per prompt and gives every token of a reply the advantage (r - mean of the group) /
(std of the group + eps). It has no value head. Its loss is the same clipped objective
plus kl_coef times the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1, averaged over each
reply's tokens and then over replies, as the paper's objective does. PPO's loss
averages over all tokens of the minibatch.

A step is one rollout followed by ppo_epochs passes over it in minibatches of
train.batch_size * train.grad_accum replies, one optimizer step per minibatch. The
loop is its own, built from gpt.training's optimizer, schedule and duration helpers,
because the shared Trainer takes one loss per micro-batch from a fixed data stream.

The output folder is a checkpoint (model.safetensors, model.json, tokenizer.json,
config.yaml) with value_head.safetensors (PPO), adapter/ (LoRA), metrics.jsonl,
reward.png, summary.json and train_state.pt for --train.resume.

Limits: one process (no torchrun); dropout is off in every forward pass, because the
probability ratio must compare one deterministic function before and after updates.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from gpt import distributed
from gpt.chat import END_OF_TURN, render_prompt, stop_token_ids
from gpt.checkpoint import TOKENIZER_FILE, check_checkpoint_dir, load_model, load_train_state, save_model, save_train_state
from gpt.config import option, save_config
from gpt.device import autocast, resolve_device, resolve_dtype
from gpt.files import atomic_write
from gpt.generate import Completion, SamplingParams, generate
from gpt.lora import add_lora, merge_adapter, save_adapter
from gpt.sft_data import load_mix
from gpt.tokenizer import Tokenizer
from gpt.training import TrainConfig, build_optimizer, format_duration, lr_at
from rlhf.losses import unwrap_gpt
from rlhf.reward import load_reward_model
from gpt.tasks import TASKS, ArithmeticConfig, Problem, evaluate_accuracy

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"
GRPO_EPS = 1e-4  # added to the group's reward std, as trl/trainer/grpo_trainer.py does; DeepSeekMath states no value


def ppo_train_defaults() -> TrainConfig:
    # Steps are rollouts. A low constant rate and no weight decay keep the policy near its
    # start; float32 because ratios and KL terms are small differences of log-probabilities.
    return TrainConfig(batch_size=16, max_steps=200, lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                       dtype="float32", eval_interval=25, checkpoint_interval=50)


@dataclass
class PPOConfig:
    """Configuration of `gptlab ppo`."""

    policy: str = option("", "checkpoint folder of the chat model to train, for example runs/NAME/sft")
    reward: str = option("", "checkpoint folder of the reward model (gptlab reward); leave empty when task is set")
    task: str = option("", f"built-in task with a rule-based reward, used instead of a reward model: {', '.join(TASKS)}")
    out_dir: str = option("", "folder to write the trained policy to; empty for the folder ppo (or grpo) beside policy")
    algorithm: Literal["ppo", "grpo"] = option("ppo", "ppo (value head, GAE) or grpo (group-relative advantages, no value head)")
    prompts: str = option("gpteacher", "reward-model runs: chat data whose conversations, without their last reply, are the prompts (a source or mix as gptlab sft takes)")
    max_prompts: int = option(0, "reward-model runs: read at most this many conversations per source; 0 reads all")
    eval_prompts: int = option(200, "held-out prompts (task problems) answered greedily at each evaluation; a task with fewer held-out problems uses all of them")
    prompts_per_step: int = option(64, "prompts sampled for each rollout")
    group_size: int = option(8, "grpo: replies sampled per prompt (at least 2); ppo samples one")
    max_new_tokens: int = option(32, "maximum tokens per reply")
    temperature: float = option(1.0, "sampling temperature of the rollouts; log-probabilities are taken at the same temperature")
    ppo_epochs: int = option(2, "passes over each rollout")
    clip_eps: float = option(0.2, "clip range of the probability ratio")
    value_clip: float = option(0.2, "ppo: clip range of the value predictions around the rollout's values")
    vf_coef: float = option(0.1, "ppo: weight of the value loss")
    gamma: float = option(1.0, "ppo: discount per reply token")
    lam: float = option(0.95, "ppo: GAE lambda")
    whiten_advantages: bool = option(True, "ppo: normalize the rollout's advantages to mean 0 and std 1 over its reply tokens")
    kl_coef: float = option(0.05, "beta: weight of the KL to the reference (a per-token reward penalty in ppo, a loss term in grpo)")
    kl_target: float = option(0.0, "target KL per reply in nats for the adaptive coefficient (Ziegler et al. 2019); 0 keeps kl_coef fixed")
    kl_horizon: int = option(10000, "adaptive KL: horizon in replies; larger values adapt kl_coef more slowly")
    unfinished_penalty: float = option(0.0, "subtracted from the score of a reply that reached max_new_tokens without a stop token")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapters' updates are scaled by lora_alpha / lora_r")
    lora_targets: str = option("all", "projections that get LoRA adapters, as gptlab sft takes them")
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig, metadata={"help": "the arithmetic task (task=arithmetic)"})
    train: TrainConfig = field(default_factory=ppo_train_defaults, metadata={"help": "optimization; a step is one rollout, batch_size counts replies per minibatch"})

    def problems(self) -> list[str]:
        found = []
        if not self.policy:
            found.append("policy is empty; pass the checkpoint folder to train, for example --policy runs/NAME/sft")
        if bool(self.reward) == bool(self.task):
            found.append(f"set exactly one of reward (a reward model folder) and task ({', '.join(TASKS)}); "
                         f"got reward={self.reward!r} and task={self.task!r}")
        if self.task and self.task not in TASKS:
            found.append(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("prompts_per_step", "max_new_tokens", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_prompts", "eval_prompts", "kl_coef", "kl_target", "lora_r", "unfinished_penalty"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.algorithm == "grpo" and self.group_size < 2:
            found.append(f"group_size must be at least 2 for grpo, whose advantages compare replies to one prompt; got {self.group_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            found.append(f"temperature must be a finite number > 0 (rollouts sample), got {self.temperature}")
        for name in ("clip_eps", "value_clip"):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lora_r and self.lora_alpha <= 0:
            found.append(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.train.fsdp or self.train.compile:
            found.append("train.fsdp and train.compile are not supported by ppo; set them to false")
        return found

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size if self.algorithm == "grpo" else 1


# ---------------------------------------------------------------------------
# Advantages and losses: pure functions of (B, R) tensors, R = reply tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over reply tokens, each reply ending in a terminal state.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where
    V_{t+1} and A_{t+1} count only while t+1 is still inside the reply (mask 1).

    Args:
        rewards, values: (B, R) per reply token.
        mask: (B, R), 1 on reply tokens, which start at column 0, and 0 on padding.

    Returns:
        (advantages, returns), each (B, R) and 0 on padding; returns = advantages + values.
    """
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO's advantages (r - mean) / (std + eps) within consecutive groups of `group_size` scores.

    The std is the sample standard deviation (divisor G - 1), as in TRL's GRPOTrainer
    (torch.std). A group whose scores are all equal gets advantages 0.

    Args:
        scores: (N,) with N a multiple of group_size; rows n*G .. n*G+G-1 share a prompt.

    Returns:
        (N,) advantages.
    """
    groups = scores.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate r - log r - 1 with r = pi_ref / pi (Schulman 2020, "Approximating KL
    Divergence", as DeepSeekMath uses it): non-negative, and 0 where the two agree."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss, max(-A r, -A clip(r, 1 - eps, 1 + eps))
    with r = pi / pi_old (Schulman et al. 2017, eq. 7, negated).

    Returns:
        ((B, R) losses, (B, R) float: 1 where the clipped term was the larger one).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token value loss 0.5 max((V - R)^2, (V_clip - R)^2), with V_clip = V_old + clip(V - V_old,
    -clip, clip), as in OpenAI baselines (baselines/ppo2/model.py).

    Returns:
        ((B, R) losses, (B, R) float: 1 where the clipped error was the larger one).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(error, clipped_error), (clipped_error > error).float()


class KLController:
    """The KL coefficient: fixed, or adapted toward `target` nats per reply by the proportional
    controller of Ziegler et al. 2019: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * replies / horizon."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_replies: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n_replies / self.horizon


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
# Prompts, scores and rollouts


@dataclass
class Prompt:
    ids: list[int]
    problem: Problem | None = None  # the task instance behind the prompt, for rule-based rewards


Scorer = Callable[[list[Prompt], list[Completion]], torch.Tensor]


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
    compute log-probabilities, rewards and advantages."""
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
    stats = {"objective/reward": scores.mean().item(), "objective/kl": kl.sum(-1).mean().item(),
             "objective/kl_coef": kl_coef, "policy/entropy": masked_mean(out.entropy, mask).item(),
             "reply/length": lengths.float().mean().item(), "reply/stopped": 1 - unfinished.float().mean().item()}
    return Rollout(input_ids, attention_mask, P, mask, out.logprobs, ref_logprobs, advantages, out.values, returns,
                   scores, kl_coef, stats)


# ---------------------------------------------------------------------------
# The update


def chunk_loss(model: PolicyWithValueHead, rollout: Rollout, rows: torch.Tensor, cfg: PPOConfig, vocab_limit: int,
               normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the loss of some rows of a minibatch, divided by the minibatch's `normalizer`
    (its reply tokens for ppo, its replies for grpo), and sums of per-token statistics."""
    mask = rollout.mask[rows]
    out = reply_forward(model.gpt, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_width,
                        cfg.temperature, vocab_limit, model.value_head)
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


def update(model: PolicyWithValueHead, optimizer: torch.optim.Optimizer, rollout: Rollout, cfg: PPOConfig,
           vocab_limit: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Run ppo_epochs passes over the rollout in shuffled minibatches, one optimizer step each.

    Returns:
        policy/clipfrac, policy/approxkl, loss/policy and, for ppo, loss/value and value/clipfrac,
        averaged over every minibatch of every epoch.
    """
    device = rollout.input_ids.device
    N = len(rollout.input_ids)
    minibatch = cfg.train.batch_size * cfg.train.grad_accum
    totals: dict[str, float] = {}
    n_steps = 0
    model.eval()  # no dropout: see the module docstring
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, minibatch):
            rows = order[start:start + minibatch].to(device)
            normalizer = len(rows) if cfg.algorithm == "grpo" else rollout.mask[rows].sum().clamp(min=1).item()
            for chunk in rows.split(cfg.train.batch_size):
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
    tokens = max(totals["tokens"], 1.0)
    stats = {"policy/clipfrac": totals["clipped"] / tokens, "policy/approxkl": totals["approxkl"] / tokens,
             "loss/policy": totals["policy_loss"] / n_steps}
    if cfg.algorithm == "ppo":
        stats.update({"loss/value": totals["value_loss"] / n_steps, "value/clipfrac": totals["value_clipped"] / tokens})
    return stats


# ---------------------------------------------------------------------------
# Prompt sources and scorers


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


def build_reward(cfg: PPOConfig, tokenizer: Tokenizer, max_prompt_tokens: int, device: torch.device):
    """Return (task or None, prompt source, scorer) for a task run or a reward-model run."""
    if cfg.task:
        task = TASKS[cfg.task](cfg.arithmetic)
        return task, TaskPrompts(task, tokenizer, cfg.eval_prompts, cfg.train.seed, max_prompt_tokens), task_scorer(task)
    reward_model = load_reward_model(cfg.reward, device)
    if reward_model.tokenizer is not None and reward_model.tokenizer.fingerprint != tokenizer.fingerprint:
        raise ValueError(f"the reward model {cfg.reward} was trained with another tokenizer than the policy "
                         f"{cfg.policy}; train the reward model from the policy's run (gptlab reward --base ...)")
    return None, DataPrompts(cfg, tokenizer, max_prompt_tokens), reward_model_scorer(reward_model, tokenizer)


@torch.no_grad()
def evaluate(model: PolicyWithValueHead, tokenizer: Tokenizer, task, heldout: list[Prompt], scorer: Scorer,
             cfg: PPOConfig, dtype: torch.dtype, batch_size: int = 64) -> dict[str, float]:
    """Greedy replies to the held-out prompts: task/accuracy and task/reward for a task,
    eval/reward (the reward model's mean score) otherwise."""
    if not heldout:
        return {}
    model.eval()
    if task is not None:
        return evaluate_accuracy(model.gpt, tokenizer, task, [p.problem for p in heldout], cfg.max_new_tokens,
                                 batch_size, dtype)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    completions = []
    for start in range(0, len(heldout), batch_size):
        chunk = [p.ids for p in heldout[start:start + batch_size]]
        completions += generate(model.gpt, chunk, params, tokenizer=tokenizer, dtype=dtype)
    return {"eval/reward": scorer(heldout, completions).mean().item()}


# ---------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(model: PolicyWithValueHead, out_dir: Path, policy_dir: Path, step: int, state: dict) -> None:
    """Write the policy (LoRA merged, adapter beside it), the value head and the resume state."""
    policy = model.policy
    meta = {"stage": "ppo", "policy": str(policy_dir)}
    if policy is not model.gpt:  # a PeftModel
        save_adapter(policy, out_dir / ADAPTER_DIR, policy_dir)
        meta["adapter"] = ADAPTER_DIR
        policy = merge_adapter(copy.deepcopy(policy))
    save_model(policy, out_dir, tokenizer_file=policy_dir / TOKENIZER_FILE, step=step, extra={"ppo": meta})
    if model.value_head is not None:
        head = {name: t.detach().cpu().contiguous() for name, t in model.value_head.state_dict().items()}
        atomic_write(out_dir / VALUE_HEAD_FILE, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    save_train_state(out_dir, state)


LOG_FIELDS = [("objective/reward", "reward", ".3f"), ("objective/kl", "kl", ".4f"), ("policy/clipfrac", "clipfrac", ".3f"),
              ("policy/approxkl", "approxkl", ".2e"), ("loss/value", "vloss", ".4f"), ("policy/entropy", "entropy", ".3f"),
              ("reply/length", "len", ".1f"), ("task/accuracy", "accuracy", ".3f"), ("eval/reward", "eval reward", ".3f")]


def log_line(record: dict, max_steps: int) -> str:
    parts = [f"step {record['step']}/{max_steps}"]
    parts += [f"{label} {record[key]:{spec}}" for key, label, spec in LOG_FIELDS if key in record]
    parts += [f"lr {record['lr']:.2e}", f"{record['ms']:.0f} ms", f"eta {format_duration(record['eta_s'])}"]
    return " | ".join(parts)


def plot_rewards(metrics_path: Path, out_path: Path, title: str) -> None:
    """Draw the rollouts' mean score per step, and the evaluation metric where evaluated, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r for r in records if "objective/reward" in r]
    ax.plot([r["step"] for r in steps], [r["objective/reward"] for r in steps], label="rollout reward", linewidth=1)
    for key in ("task/accuracy", "eval/reward"):
        evals = [r for r in records if key in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=f"held-out {key}")
    ax.set_xlabel("step (rollout)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def evaluation_before(metrics_path: Path) -> dict[str, float]:
    """Return the evaluation a resumed run did before its first step: the step-0 record of metrics.jsonl."""
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("step") == 0:
            return {key: value for key, value in record.items() if key != "step"}
    return {}


# ---------------------------------------------------------------------------
# The stage


def train(cfg: PPOConfig) -> dict:
    """Train the policy of `cfg.policy` with PPO or GRPO and write the checkpoint; return a summary
    with the evaluation before and after.

    Raises:
        ValueError: an invalid config, prompts that leave no room to reply, a reward model with
            another tokenizer, or an out_dir that is the policy folder.
        FileNotFoundError: a checkpoint folder or one of its files is missing.
        NotImplementedError: more than one process.
    """
    problems = cfg.problems()  # build_config checks these too, but train() may be called directly
    if problems:
        raise ValueError("invalid ppo config:\n  " + "\n  ".join(problems))
    if distributed.world_size() > 1:
        raise NotImplementedError("ppo runs in one process; start it without torchrun")
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    policy_dir = check_checkpoint_dir(cfg.policy)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else policy_dir.parent / cfg.algorithm
    if out_dir.resolve() == policy_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the policy's checkpoint folder, which training would "
                         f"overwrite; set out_dir to another folder")
    tokenizer = Tokenizer.from_file(policy_dir / TOKENIZER_FILE)
    policy = load_model(policy_dir)
    max_prompt_tokens = policy.config.block_size - cfg.max_new_tokens
    if max_prompt_tokens < 2:
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in block_size "
                         f"{policy.config.block_size}; lower max_new_tokens")
    reference = None
    if cfg.lora_r:
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval().to(device)
    model = PolicyWithValueHead(policy, value_head=cfg.algorithm == "ppo").to(device)
    task, prompts, scorer = build_reward(cfg, tokenizer, max_prompt_tokens, device)
    optimizer = build_optimizer(model, cfg.train, device)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    vocab_limit = min(model.gpt.config.vocab_size, tokenizer.vocab_size)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %s trainable parameters (%s); %d prompts x %d replies per step, %d epochs in minibatches of %d",
                cfg.algorithm, f"{n_trainable:,}", f"LoRA r={cfg.lora_r}" if cfg.lora_r else "full",
                cfg.prompts_per_step, cfg.samples_per_prompt, cfg.ppo_epochs,
                cfg.train.batch_size * cfg.train.grad_accum)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    metrics_path = out_dir / "metrics.jsonl"
    step, elapsed = 0, 0.0
    if cfg.train.resume:
        from gpt.training import _truncate_metrics

        state = load_train_state(out_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        kl.coef, step, elapsed = state["kl_coef"], state["step"], state["elapsed"]
        torch.set_rng_state(state["rng_cpu"])
        _truncate_metrics(metrics_path, step)
        logger.info("resumed at step %d from %s", step, out_dir)
    elif metrics_path.exists():
        metrics_path.unlink()

    def run_eval() -> dict[str, float]:
        return evaluate(model, tokenizer, task, prompts.heldout, scorer, cfg, dtype)

    def done() -> bool:
        return step >= cfg.train.max_steps or (cfg.train.max_time > 0 and elapsed >= cfg.train.max_time)

    before = run_eval() if step == 0 else evaluation_before(metrics_path)
    step_times: list[float] = []
    last_eval = before
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        if before and step == 0:
            logger.info("before training: %s", json.dumps(before))
            metrics_file.write(json.dumps({"step": 0, **before}) + "\n")
        while not done():
            t0 = time.perf_counter()
            progress = step / cfg.train.max_steps
            if cfg.train.max_time > 0:
                progress = max(progress, elapsed / cfg.train.max_time)
            lr = lr_at(progress, step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed = cfg.train.seed * 100_003 + step
            rollout = collect_rollout(model, reference, tokenizer, prompts.sample(cfg.prompts_per_step, seed), scorer,
                                      kl.coef, cfg, seed, dtype)
            stats = update(model, optimizer, rollout, cfg, vocab_limit, torch.Generator().manual_seed(seed), dtype)
            kl.update(rollout.stats["objective/kl"], len(rollout.scores))
            dt = time.perf_counter() - t0
            step, elapsed = step + 1, elapsed + dt
            step_times.append(dt)
            eta = (cfg.train.max_steps - step) * elapsed / step
            record = {"step": step, **rollout.stats, **stats, "lr": lr, "ms": 1000 * dt, "elapsed_s": elapsed,
                      "eta_s": eta}
            evaluated = done() or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0)
            if evaluated:
                last_eval = run_eval()
                record.update(last_eval)
            if step % cfg.train.log_interval == 0 or evaluated:
                logger.info(log_line(record, cfg.train.max_steps))
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if step % cfg.train.checkpoint_interval == 0 or done():
                state = {"step": step, "elapsed": elapsed, "kl_coef": kl.coef, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
                save_checkpoint(model, out_dir, policy_dir, step, state)

    steady = step_times[min(len(step_times) // 5, 10):] or step_times or [0.0]
    summary = {"steps": step, "elapsed_s": elapsed, "steady_step_ms": 1000 * sum(steady) / len(steady),
               "before": before, "after": last_eval}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_rewards(metrics_path, out_dir / "reward.png", f"{cfg.algorithm} {out_dir.parent.name}")
    logger.info("done: %d steps in %s | before %s | after %s | checkpoint %s", step, format_duration(elapsed),
                json.dumps(before), json.dumps(last_eval), out_dir)
    return summary
