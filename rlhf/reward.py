"""Reward model (`gptlab reward`): a GPT trunk with a scalar head, trained on preference
pairs with the Bradley-Terry loss.

    gptlab reward --base runs/NAME/sft                 # -> runs/NAME/reward

The reward of a conversation is the head, nn.Linear(n_embd, 1, bias=False), applied to the final
hidden state of its last real token, which for a rendered conversation is the <|end|>
closing the reply. Padding may sit on either side. Each batch contains the chosen and the
rejected conversations of its pairs, and the loss is -log sigmoid(r_chosen - r_rejected)
(`rlhf.losses.bradley_terry_loss`). Loss, accuracy (share of pairs with r_chosen >
r_rejected) and margin (mean r_chosen - r_rejected) are logged for training batches and,
as val_loss, val_accuracy and val_margin, for the held-out pairs at each evaluation.

The output folder is a checkpoint. Its model.safetensors contains the trunk (a normal
GPT, output layer included), reward_head.safetensors the head, and model.json a
"reward_model" field that `load_reward_model` requires.

Limits: rewards are not normalized (their offset is arbitrary); no LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gpt import distributed
from gpt.chat import render_chat
from gpt.checkpoint import (TOKENIZER_FILE, check_checkpoint_dir, load_model, read_model_meta, read_safetensors,
                            require_resume_state, save_model)
from gpt.config import option, save_config
from gpt.files import atomic_write
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer, plot_loss
from rlhf.losses import bradley_terry_loss
from rlhf.pair_batches import PAD_ID, PairBatches
from rlhf.preference_data import PairDataConfig, prepare_pairs

logger = logging.getLogger(__name__)

HEAD_FILE = "reward_head.safetensors"
META_KEY = "reward_model"


class RewardModel(nn.Module):
    """A GPT trunk and a linear head that maps the last real token's hidden state to a reward.

    Args:
        trunk: the GPT, or a ModelConfig to build a fresh one from.
        tokenizer: needed only by `score` on conversations.
    """

    def __init__(self, trunk: GPT | ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.gpt = trunk if isinstance(trunk, GPT) else GPT(trunk)
        self.config = self.gpt.config
        if not self.config.tie_embeddings:
            # The output layer is never run, so it must not count as trainable: DDP would wait
            # for its gradient, and the optimizer would hold state for it.
            self.gpt.lm_head.weight.requires_grad_(False)
        # The Bradley-Terry loss depends only on differences of rewards, so a constant added to every
        # reward gets no gradient. The head therefore has no bias (as transformers'
        # *ForSequenceClassification heads), and the final norm's bias, which only shifts every
        # reward by head . bias, is frozen.
        self.head = nn.Linear(self.config.n_embd, 1, bias=False)
        if getattr(self.gpt.norm_f, "bias", None) is not None:
            self.gpt.norm_f.bias.requires_grad_(False)
        # Small enough that the first rewards are near 0 whatever the hidden scale.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(self.config.n_embd + 1))
        self.tokenizer = tokenizer

    @property
    def blocks(self) -> nn.ModuleList:
        """The trunk's transformer blocks, the units that FSDP shards."""
        return self.gpt.blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of (B, T) token ids with an optional (B, T) mask (1 real, 0 padding); returns (B,) float32.

        The reward is read at the last position whose mask is 1, whichever side the padding is on.
        """
        B, T = input_ids.shape
        hidden = self.gpt(input_ids, attention_mask=attention_mask, return_hidden=True, compute_logits=False).hidden
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            positions = torch.arange(T, device=input_ids.device)
            last = (attention_mask.bool() * positions).amax(-1)  # (B,)
        return self.head(hidden[torch.arange(B, device=input_ids.device), last]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, inputs: Sequence[Sequence[Mapping[str, str]]] | Sequence[Sequence[int]] | torch.Tensor,
              attention_mask: torch.Tensor | None = None, batch_size: int = 32) -> torch.Tensor:
        """Reward of each conversation, in eval mode and without gradients.

        Args:
            inputs: conversations (lists of {"role", "content"} messages, rendered with the
                chat template; needs `tokenizer`), lists of token ids, or a (B, T) tensor.
            attention_mask: (B, T) for a tensor input; None when it has no padding.
            batch_size: rows per forward pass for list inputs.

        Returns:
            (N,) float32 rewards on the model's device.

        Raises:
            ValueError: conversations without a tokenizer, or an empty row.
        """
        was_training = self.training
        self.eval()
        try:
            if isinstance(inputs, torch.Tensor):
                return self(inputs.to(self.head.weight.device),
                            attention_mask.to(self.head.weight.device) if attention_mask is not None else None)
            rows = [self._ids(item, index) for index, item in enumerate(inputs)]
            return torch.cat([self._score_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])
        finally:
            self.train(was_training)

    def _ids(self, item: Sequence, index: int) -> list[int]:
        if len(item) == 0:
            raise ValueError(f"input {index} is empty; pass a conversation or at least one token id")
        if isinstance(item[0], Mapping):
            if self.tokenizer is None:
                raise ValueError("scoring conversations needs the tokenizer: load the model with load_reward_model, "
                                 "or pass token ids")
            ids = render_chat(self.tokenizer, item, source=f"conversation {index}")[0]
        else:
            ids = [int(token) for token in item]
        if len(ids) > self.config.block_size:
            # NOTE: the start of an over-long input is dropped, so its reward still reads the final token.
            logger.warning("input %d has %d tokens, more than block_size %d; scoring its last %d", index, len(ids),
                           self.config.block_size, self.config.block_size)
            ids = ids[-self.config.block_size:]
        return ids

    def _score_rows(self, rows: list[list[int]]) -> torch.Tensor:
        device = self.head.weight.device
        T = max(len(row) for row in rows)
        ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return self(ids.to(device), mask.to(device))


def save_reward_model(model: RewardModel, out_dir: str | os.PathLike, *,
                      tokenizer_file: str | os.PathLike | None = None, step: int | None = None,
                      extra: dict | None = None) -> None:
    """Write the trunk as a checkpoint (model.json marked as a reward model) and the head beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.head.state_dict().items()}
    atomic_write(out_dir / HEAD_FILE, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    meta = {META_KEY: {"head": HEAD_FILE, **(extra or {})}}
    save_model(model.gpt, out_dir, tokenizer_file=tokenizer_file, step=step, extra=meta)


def load_reward_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> RewardModel:
    """Load a reward model that `gptlab reward` wrote, with its tokenizer when the folder has one.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the folder contains a language model, not a reward model, or its head does not fit.
    """
    ckpt_dir = check_checkpoint_dir(ckpt_dir, need=("model.safetensors", "model.json"))
    meta = read_model_meta(ckpt_dir)
    if META_KEY not in meta:
        raise ValueError(f"{ckpt_dir} contains a language model, not a reward model: its model.json has no "
                         f"{META_KEY!r} field. Train a reward model with gptlab reward --base {ckpt_dir}")
    head_path = ckpt_dir / meta[META_KEY].get("head", HEAD_FILE)
    if not head_path.is_file():
        raise FileNotFoundError(f"reward model {ckpt_dir} is missing its head {head_path.name}; rerun gptlab reward")
    tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER_FILE) if (ckpt_dir / TOKENIZER_FILE).is_file() else None
    model = RewardModel(load_model(ckpt_dir), tokenizer)
    head = read_safetensors(head_path)
    expected = {name: tuple(t.shape) for name, t in model.head.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in head.items()}
    if found != expected:
        raise ValueError(f"{head_path} contains {found}, but a head for n_embd {model.config.n_embd} needs {expected}; "
                         "the head belongs to another model")
    model.head.load_state_dict(head)
    return model.to(device)


# ---------------------------------------------------------------------------
# The stage


def reward_train_defaults() -> TrainConfig:
    # Starting from trained weights: a low peak rate, a short warmup and no weight decay,
    # which would pull the trunk toward zero rather than toward the base model.
    return TrainConfig(batch_size=8, max_steps=500, lr=5e-5, warmup_steps=20, weight_decay=0.0,
                       eval_interval=50, eval_batches=10, checkpoint_interval=100)


@dataclass
class RewardConfig:
    """Configuration of `gptlab reward`."""

    base: str = option("", "checkpoint folder the reward model starts from, usually the SFT model: runs/NAME/sft")
    out_dir: str = option("", "folder to write the reward model to; empty for the folder reward beside base (runs/NAME/sft -> runs/NAME/reward)")
    data: PairDataConfig = field(default_factory=PairDataConfig, metadata={"help": "preference pairs"})
    train: TrainConfig = field(default_factory=reward_train_defaults, metadata={"help": "optimization (batch_size counts pairs)"})

    def problems(self) -> list[str]:
        if not self.base:
            return ["base is empty; pass the checkpoint folder to start from, for example --base runs/NAME/sft"]
        return []


def reward_statistics(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the (B,) losses, chosen rewards and rejected rewards of one micro-batch of pairs."""
    device = next(model.parameters()).device
    rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return bradley_terry_loss(chosen, rejected), chosen, rejected


def reward_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Return the sum of the pair losses of a micro-batch, its number of pairs and its metrics, for the Trainer."""
    losses, chosen, rejected = reward_statistics(model, batch)
    margin = (chosen - rejected).detach()
    metrics = {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}
    return losses.sum(), batch["n_pairs"], metrics


@torch.no_grad()
def evaluate_pairs(model: RewardModel, heldout: PairBatches, max_batches: int) -> dict[str, float]:
    """Compute val_loss, val_accuracy and val_margin over the first max_batches held-out micro-batches."""
    loss_sum, correct, margin_sum, count = 0.0, 0.0, 0.0, 0
    for batch in heldout.in_order(max_batches):
        losses, chosen, rejected = reward_statistics(model, batch)
        loss_sum += losses.sum().item()
        correct += (chosen > rejected).sum().item()
        margin_sum += (chosen - rejected).sum().item()
        count += batch["n_pairs"]
    if not count:
        return {}
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count, "val_margin": margin_sum / count}


def train(cfg: RewardConfig) -> dict:
    """Train a reward model on `cfg.data` from `cfg.base` and write it; return the Trainer's summary.

    Raises:
        ValueError: an invalid config, bad data, or an out_dir that is the base folder.
        FileNotFoundError: the base checkpoint or one of its files is missing.
    """
    problems = cfg.problems() + cfg.data.problems()
    if problems:
        raise ValueError("invalid reward config:\n  " + "\n  ".join(problems))
    distributed.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    base_dir = check_checkpoint_dir(cfg.base)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else base_dir.parent / "reward"
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the base checkpoint folder, which training would overwrite; "
                         "set out_dir to another folder")
    if cfg.train.resume:
        require_resume_state(out_dir)

    tokenizer_file = base_dir / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = RewardModel(load_model(base_dir), tokenizer)
    data = prepare_pairs(cfg.data, tokenizer, model.config.block_size, str(base_dir))
    logger.info("model: %s parameters (trunk from %s, new head)",
                f"{sum(p.numel() for p in model.parameters()):,}", base_dir)

    batches = PairBatches(data.train, cfg.train.batch_size, cfg.data.seed, rank=distributed.rank(),
                          world_size=distributed.world_size())
    heldout = PairBatches(data.heldout, cfg.train.batch_size, cfg.data.seed) if data.heldout else None
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_pairs(m, heldout, cfg.train.eval_batches) if heldout is not None else {}

    def save(m: RewardModel, step: int) -> None:
        save_reward_model(m, out_dir, tokenizer_file=tokenizer_file, step=step,
                          extra={"base": str(base_dir), "data": cfg.data.source})

    # The output layer is never run: 6 FLOPs per token for each of its weights come off.
    gpt = model.gpt
    flops = gpt.flops_per_token(data.block_size) - 6 * gpt.lm_head.weight.numel()
    hooks = Hooks(loss_fn=reward_loss, evaluate=evaluate, save=save,
                  tokens_per_batch=lambda batch: batch["n_tokens"], flops_per_token=flops)
    summary = Trainer(model, cfg.train, out_dir, batches, hooks).run()
    if distributed.is_main():
        plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"reward {out_dir.parent.name}",
                  ylabel="Bradley-Terry loss (nats per pair)", extra=("accuracy", "margin"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logger.info("reward model: %s", out_dir)
    return summary
