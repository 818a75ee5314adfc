"""Advantages and per-token losses of PPO and GRPO, as pure functions of (B, R) tensors
(R = reply tokens), and the adaptive KL coefficient.

PPO's advantages come from GAE (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation", eq. 16) over the reply tokens only; GRPO's from
the scores of a group of replies to one prompt (Shao et al. 2024, "DeepSeekMath",
arXiv:2402.03300). `whiten` is the one function here that talks to other processes:
under torchrun it normalizes over the reply tokens of every process.
"""

from __future__ import annotations

import torch

from gpt import distributed

GRPO_EPS = 1e-4  # added to the group's reward std, as trl/trainer/grpo_trainer.py does; DeepSeekMath states no value


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0.

    Under torchrun the mean and std are those of the masked entries of every process, as
    in one process holding the whole rollout, so every process must call it.
    """
    sums = distributed.all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    count = sums[1].clamp(min=1)
    mean = sums[0] / count
    var = distributed.all_reduce_sum(((x - mean) ** 2 * mask).sum()) / count
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
        """Adapt the coefficient after a step.

        Args:
            kl: mean KL per reply of the step. Under torchrun, pass the mean over every
                process's replies, so that all processes keep the same coefficient.
            n_replies: replies of the step, over every process.
        """
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n_replies / self.horizon
