"""Optimizers other than AdamW, chosen with `train.optimizer` (see `gpt.training.build_optimizer`).

- `Lion` (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
  the update is the sign of an interpolation between the momentum and the gradient, so
  every weight moves by exactly lr per step. It keeps one state tensor per weight where
  AdamW keeps two.
- `MuonWithAdamW`: Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in
  neural networks") on the 2-D weight matrices inside the transformer blocks, and AdamW
  on everything else (embeddings, output layer, biases, norm gains), as Muon's authors
  prescribe. Muon is `torch.optim.Muon`, which torch 2.13 ships: momentum whose update is
  orthogonalized by a Newton-Schulz iteration. Older torch versions may lack it, and then
  `build_muon` raises NotImplementedError. It runs with `adjust_lr_fn="match_rms_adamw"`
  (Liu et al. 2025, "Muon is Scalable for LLM Training"), which scales each matrix's
  update to the RMS of a typical AdamW update, so both parts share one learning rate
  and one weight decay.

Both are ordinary `torch.optim.Optimizer`s: the training loop sets `lr` in every param
group, and the resume state saves and loads them like AdamW.

Limits: Muon needs whole matrices, so it rejects parameters sharded by FSDP2 (DTensor).
The Newton-Schulz iteration of torch.optim.Muon runs in bfloat16 on every device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


class Lion(torch.optim.Optimizer):
    """Lion: sign of the interpolated momentum, with decoupled weight decay.

    For each weight p with gradient g and momentum m (Chen et al. 2023, Algorithm 2):

        update = sign(beta1 * m + (1 - beta1) * g)
        p      = p - lr * (update + weight_decay * p)
        m      = beta2 * m + (1 - beta2) * g

    Because the update has unit size in every coordinate, the paper uses a learning
    rate 3-10x smaller than AdamW's and a weight decay 3-10x larger, so that the
    product lr * weight_decay stays about the same.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (beta1, beta2); the paper's default is (0.9, 0.99).
        weight_decay: decoupled weight decay, multiplied by lr as in AdamW.

    Raises:
        ValueError: a negative lr or weight decay, or a beta outside [0, 1).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"Lion lr must be 0 or more, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"Lion weight_decay must be 0 or more, got {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                update = momentum.lerp(p.grad, 1 - beta1).sign_()  # beta1 * m + (1 - beta1) * g
                p.mul_(1 - lr * weight_decay)
                p.add_(update, alpha=-lr)
                momentum.lerp_(p.grad, 1 - beta2)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on hidden weight matrices and AdamW on the other parameters, as one optimizer.

    It wraps a `torch.optim.Muon` and a `torch.optim.AdamW` and presents their param
    groups and state as its own. `param_groups` contains the very group dicts of the two,
    so setting `lr` in it reaches them, and `state_dict()` and `load_state_dict()` cover
    both.

    Args:
        muon_params: 2-D weights for Muon.
        adamw_groups: param groups for AdamW, each a dict with "params" and optionally
            "weight_decay"; empty when every trainable parameter goes to Muon.
        lr: learning rate of both parts (Muon's is rescaled per matrix, see the module docstring).
        weight_decay: Muon's decoupled weight decay; AdamW groups set their own.
        momentum: Muon's momentum (Nesterov).
        betas: AdamW's betas.
        fused: use AdamW's fused kernel (CUDA).

    Raises:
        ValueError: a Muon parameter is not 2-D (from torch.optim.Muon).
    """

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict], *, lr: float,
                 weight_decay: float, momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                 fused: bool = False) -> None:
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")
        # torch.optim.AdamW rejects an empty parameter list, so a model whose only trainable
        # weights are hidden matrices (LoRA adapters, for example) has no AdamW part.
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused) if adamw_groups else None
        adamw_group_dicts = self.adamw.param_groups if self.adamw is not None else []
        # The Optimizer constructor adds the two parts' own group dicts, so they stay shared.
        super().__init__([*self.muon.param_groups, *adamw_group_dicts], defaults={})
        self._link_parts()

    def _link_parts(self) -> None:
        """Point both parts at this optimizer's group dicts and its one state dict (the two
        parts hold disjoint parameters, so their states never collide)."""
        n_muon = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n_muon]
        self.muon.state = self.state
        if self.adamw is not None:
            self.adamw.param_groups = self.param_groups[n_muon:]
            self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # The base class replaces the group dicts and the state with new objects.
        super().load_state_dict(state_dict)
        self._link_parts()


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """True for a 2-D weight inside a transformer block (attention and MLP projections),
    the parameters Muon is meant for; False for embeddings, the output layer, biases and norms."""
    return param.dim() == 2 and (name.startswith("blocks.") or ".blocks." in name)


def build_muon(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               fused: bool = False) -> MuonWithAdamW:
    """Build Muon for the hidden matrices of `model` and AdamW (decay on matrices only) for the rest.

    Raises:
        NotImplementedError: torch has no torch.optim.Muon, or the model's parameters are
            sharded by FSDP2.
        ValueError: the model has no hidden matrices (no `blocks` module).
    """
    if not hasattr(torch.optim, "Muon"):
        raise NotImplementedError(f"train.optimizer=muon uses torch.optim.Muon, which torch {torch.__version__} "
                                  f"does not have; install a newer torch (2.13 has it) or use adamw or lion")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(isinstance(p, DTensor) for _, p in named):
        raise NotImplementedError("train.optimizer=muon orthogonalizes whole matrices, and FSDP2 shards them "
                                  "across processes; use train.optimizer=adamw or lion with train.fsdp, "
                                  "or run muon without train.fsdp (DDP)")
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    if not hidden:
        raise ValueError(f"train.optimizer=muon found no trainable 2-D weights inside transformer blocks "
                         f"of this {type(model).__name__}; use train.optimizer=adamw")
    other_matrices = [p for name, p in named if p.dim() >= 2 and not is_hidden_matrix(name, p)]
    vectors = [p for _, p in named if p.dim() < 2]
    adamw_groups = [{"params": other_matrices, "weight_decay": weight_decay},
                    {"params": vectors, "weight_decay": 0.0}]
    adamw_groups = [group for group in adamw_groups if group["params"]]
    return MuonWithAdamW(hidden, adamw_groups, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
