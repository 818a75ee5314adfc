"""Alignment losses as small pure functions of log-probabilities and rewards, and the
log-probability helpers that the reward, DPO and PPO stages share.

Losses (each a function of per-pair tensors of shape (B,), returning (B,) losses):

    bradley_terry_loss  reward model: -log sigmoid(r_chosen - r_rejected)
    dpo_loss            Rafailov et al. 2023, DPO
    ipo_loss            Azar et al. 2023, IPO
    cdpo_loss           Mitchell 2023, conservative DPO (DPO with label smoothing)

`PREFERENCE_LOSSES` names the last three for `gptlab dpo --loss`, with the kind of
sequence log-probability each expects: DPO and cDPO take sums over the reply tokens,
IPO takes per-token averages.

Log-probabilities (`token_logprobs`, `sequence_logprobs`) run a GPT once and apply its
output layer only at the positions that are scored, so a batch whose prompts are long
does not pay for logits it never reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gpt.lora import is_peft_model
from gpt.model import GPT

# ---------------------------------------------------------------------------------------------
# Losses


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss under the Bradley-Terry model, -log sigmoid(r_chosen - r_rejected).

    Bradley and Terry 1952 model P(chosen preferred) = sigmoid(r_chosen - r_rejected);
    this is its negative log-likelihood, as in Ouyang et al. 2022 (InstructGPT), eq. 1.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the two replies.

    Returns:
        (B,) losses.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def preference_logits(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor) -> torch.Tensor:
    """h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l): how much more the policy than the
    reference prefers the chosen reply y_w over the rejected y_l. All tensors (B,)."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Direct Preference Optimization, -log sigmoid(beta * h).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", eq. 7, with h from `preference_logits` and log-probs
    summed over the reply tokens. At h = 0 (policy == reference) the loss is ln 2.

    Returns:
        (B,) losses.
    """
    h = preference_logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Identity Preference Optimization, (h - 1 / (2 beta))^2.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, where beta is the regularization strength tau. The squared
    loss pulls h to a finite target instead of pushing it to infinity as DPO does.

    The log-probs must be per-token averages over each reply (sum / reply tokens), as
    TRL 1.16 does for loss_type "ipo": TRL notes that the IPO authors confirmed the
    results of their paper use this normalization. Summed log-probs would make the
    target margin 1 / (2 beta) mean less for longer replies.

    Returns:
        (B,) losses.
    """
    h = preference_logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
              beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: DPO on labels flipped with probability eps = label_smoothing,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO". The
    loss is smallest at a finite h = ln((1 - eps) / eps) / beta, so noisy labels cannot
    push the margins up without bound; eps = 0 is DPO. TRL 1.16's loss_type "sigmoid"
    ignores label_smoothing; its "aot" applies this formula to the batch's sorted
    log-ratios, which for a single pair is this loss.

    Returns:
        (B,) losses.
    """
    h = preference_logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@dataclass(frozen=True)
class PreferenceLoss:
    """A DPO-family loss and the sequence log-probability it expects."""

    fn: Callable[..., torch.Tensor]
    average_logps: bool  # per-token averages over the reply; otherwise sums
    uses_label_smoothing: bool = False


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, average_logps=False),
    "ipo": PreferenceLoss(ipo_loss, average_logps=True),
    "cdpo": PreferenceLoss(cdpo_loss, average_logps=False, uses_label_smoothing=True),
}


def preference_loss(name: str, beta: float, label_smoothing: float = 0.0) -> Callable[..., torch.Tensor]:
    """Return the loss `name` of `PREFERENCE_LOSSES` with beta (and, for cdpo, label_smoothing) bound.

    Returns:
        fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps) -> (B,) losses.
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
    spec = PREFERENCE_LOSSES[name]
    if spec.uses_label_smoothing:
        return functools.partial(spec.fn, beta=beta, label_smoothing=label_smoothing)
    return functools.partial(spec.fn, beta=beta)


# ---------------------------------------------------------------------------------------------
# Log-probabilities


def unwrap_gpt(model: nn.Module) -> GPT:
    """Return the GPT inside DistributedDataParallel, torch.compile and peft wrappers.

    Raises:
        TypeError: no GPT is found inside `model`.
    """
    while not isinstance(model, GPT):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif is_peft_model(model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            raise TypeError(f"expected a GPT, possibly wrapped by DDP, torch.compile or peft; got "
                            f"{type(model).__name__}")
    return model


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for (..., V) logits and (...) targets, in float32, without
    building the whole log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   mask: torch.Tensor, temperature: float = 1.0, *,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Compute the log-probability of each masked token given the tokens before it.

    The model runs once over the rows. Its output layer is applied only to the
    hidden state before each masked token, so unmasked positions cost no logits.
    Padding on either side gives the same values: `GPT.forward` counts positions
    over real tokens only.

    Args:
        model: a GPT, or one wrapped by DDP, torch.compile or peft (its forward runs
            through the wrapper, so LoRA adapters and gradient sync apply).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens and 0 for padding; a boolean
            (B, 1, T, T) mask for packed rows; or None.
        mask: (B, T) bool, True on the tokens to score; position 0 must be False
            because no token precedes it.
        temperature: the logits are divided by it (PPO samples at a temperature).
        position_ids: (B, T) positions, needed with a packed (4-D) attention_mask.

    Returns:
        (B, T) float32: log p(input_ids[b, t] | input_ids[b, :t]) where mask is True, 0 elsewhere.
    """
    mask = mask.bool()
    if mask[:, 0].any():
        raise ValueError("mask marks position 0, which has no earlier token to predict it from; shift the mask "
                         "so it marks tokens 1..T-1")
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, return_hidden=True,
                compute_logits=False)
    rows, cols = mask.nonzero(as_tuple=True)
    hidden = out.hidden[rows, cols - 1]  # (N, C): the state that predicts each scored token
    logits = unwrap_gpt(model).lm_head(hidden)  # (N, V)
    if temperature != 1.0:
        logits = logits.float() / temperature
    picked = gather_logprobs(logits, input_ids[rows, cols])  # (N,)
    return torch.zeros(mask.shape, device=picked.device, dtype=picked.dtype).index_put((rows, cols), picked)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or per-token mean) the log-probabilities of the masked tokens of each sequence.

    Args: as `token_logprobs`; mask usually marks a reply, never the prompt or padding.
        segments: for packed rows, (B, T) the index of the sequence each token belongs
            to (-1 on padding); None when each row is one sequence.
        average: divide each sum by its sequence's number of masked tokens (at least 1).

    Returns:
        ((S,) float32 log-probabilities, (S,) number of masked tokens), one per row, or
        with segments one per sequence index 0..S-1.

    Raises:
        ValueError: a masked token is the first token of its segment, so nothing of its
            own sequence precedes it.
    """
    mask = mask.bool()
    per_token = token_logprobs(model, input_ids, attention_mask, mask, position_ids=position_ids)
    if segments is None:
        logps, counts = per_token.sum(-1), mask.sum(-1)
    else:
        if (mask[:, 1:] & (segments[:, 1:] != segments[:, :-1])).any():
            raise ValueError("mask marks the first token of a packed sequence, which only the previous sequence "
                             "precedes; mask tokens after the first of each sequence")
        index = segments[mask]  # (N,) sequence of each scored token
        n_sequences = int(segments.max()) + 1
        logps = per_token.new_zeros(n_sequences).index_add(0, index, per_token[mask])
        counts = torch.zeros(n_sequences, dtype=torch.long, device=mask.device).index_add(
            0, index, torch.ones_like(index))
    return (logps / counts.clamp(min=1) if average else logps), counts
