"""Direct preference optimization (`gptlab dpo`): align a chat model on preference pairs
with DPO, IPO or conservative DPO, against the frozen starting policy as the reference.

    gptlab dpo --policy runs/NAME/sft                        # full DPO -> runs/NAME/dpo
    gptlab dpo --policy runs/NAME/sft --loss ipo --beta 0.5
    gptlab dpo --policy runs/NAME/sft --loss cdpo --label_smoothing 0.1
    gptlab dpo --policy runs/NAME/sft --lora_r 16 --train.lr 5e-4

The chosen and the rejected conversations of a micro-batch run through the model in one
forward pass, packed by default into rows no longer than the longest of them (see
`rlhf.pair_batches.collate_pairs`), which skips most of the padding. A sequence's
log-probability sums the reply tokens only (the reply's content and its closing
<|end|>), never the prompt or padding. IPO divides each sum by the reply's token count
(see `rlhf.losses`). The reference log-probs of a batch are computed first, under
no_grad, by a frozen copy of the starting policy. With LoRA they come from the policy
itself with its adapters disabled (peft's `disable_adapter`), so that no second copy
of the weights is held.

Logged per step (means over pairs), and for the held-out pairs at each evaluation
with a val_ prefix:
    rewards/chosen, rewards/rejected  beta * (policy - reference) log-probs of the reply
    rewards/accuracies                share of pairs whose chosen reward is the higher
    rewards/margins                   chosen minus rejected reward
    logps/chosen, logps/rejected      the policy's log-probs as the loss uses them
                                      (per-token averages for IPO, sums otherwise)
    kl/chosen_per_token               an estimate of KL(policy || reference): the policy
                                      minus reference log-prob summed over all chosen reply
                                      tokens of the batch, divided by their number. The
                                      chosen replies are not samples of the policy, so it
                                      only tracks how far the policy has moved.

Dropout is turned off by default (disable_dropout): with it, policy and reference would
disagree at the start and the first loss would not be ln 2. The saved model.json then
records dropout 0.

The output folder is saved as `gptlab sft` saves its own: a full checkpoint, or with
LoRA the adapter in adapter/ and the merged weights in model.safetensors.

Limits: LoRA does not run with train.fsdp. Under FSDP the reference copy is not
sharded, so each process holds it whole.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from gpt import distributed
from gpt.checkpoint import (MODEL_CONFIG_FILE, TOKENIZER_FILE, check_checkpoint_dir, load_model, require_resume_state,
                            save_model)
from gpt.config import option, save_config
from gpt.lora import TARGET_SHORTCUTS, add_lora, is_peft_model, merge_adapter, save_adapter
from gpt.model import GPT, MLP, Attention
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer, plot_loss
from rlhf.losses import PREFERENCE_LOSSES, preference_loss, sequence_logprobs
from rlhf.pair_batches import PairBatches
from rlhf.preference_data import PairDataConfig, prepare_pairs

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def dpo_train_defaults() -> TrainConfig:
    # A small step from trained weights: a low peak rate, a short warmup, and no weight
    # decay, which would pull the weights toward zero rather than toward the reference.
    return TrainConfig(batch_size=8, max_steps=500, lr=2e-5, warmup_steps=20, weight_decay=0.0,
                       eval_interval=50, eval_batches=10, checkpoint_interval=100)


@dataclass
class DPOConfig:
    """Configuration of `gptlab dpo`."""

    policy: str = option("", "checkpoint folder of the starting policy, which is also the reference: usually runs/NAME/sft")
    out_dir: str = option("", "folder to write the aligned checkpoint to; empty for the folder dpo beside policy (runs/NAME/sft -> runs/NAME/dpo)")
    data: PairDataConfig = field(default_factory=PairDataConfig, metadata={"help": "preference pairs"})
    loss: Literal["dpo", "ipo", "cdpo"] = option("dpo", "dpo (Rafailov et al. 2023), ipo (Azar et al. 2023, per-token average log-probs) or cdpo (conservative DPO, Mitchell 2023)")
    beta: float = option(0.1, "strength of the pull toward the reference: the inverse temperature of DPO and cDPO, IPO's regularization tau")
    label_smoothing: float = option(0.0, "cdpo only: assumed probability that a preference label is flipped, in (0, 0.5)")
    disable_dropout: bool = option(True, "set the model's dropout to 0, so that policy and reference agree at the start")
    pack: bool = option(True, "pack the sequences of a micro-batch into rows no longer than its longest, kept apart by a block-diagonal attention mask; false pads each to the longest")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight. LoRA usually wants a higher train.lr, about 5e-4")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapters' updates are scaled by lora_alpha / lora_r")
    lora_dropout: float = option(0.0, "dropout probability on the input of each LoRA adapter during training")
    lora_targets: str = option("all", "comma-separated projections that get LoRA adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or the shortcuts attention, mlp, all")
    train: TrainConfig = field(default_factory=dpo_train_defaults, metadata={"help": "optimization (batch_size counts pairs)"})

    def problems(self) -> list[str]:
        found = []
        if not self.policy:
            found.append("policy is empty; pass the checkpoint folder to align, for example --policy runs/NAME/sft")
        if self.beta <= 0:
            found.append(f"beta must be positive, for example 0.1, got {self.beta}")
        if self.loss == "cdpo" and not 0 < self.label_smoothing < 0.5:
            found.append(f"loss cdpo needs label_smoothing in (0, 0.5), for example 0.1, got {self.label_smoothing}")
        if self.loss != "cdpo" and self.label_smoothing != 0:
            found.append(f"label_smoothing ({self.label_smoothing}) applies to loss cdpo only; set loss=cdpo or "
                         f"label_smoothing=0")
        if self.lora_r < 0:
            found.append(f"lora_r must be 0 (full training) or a positive rank, got {self.lora_r}")
        if self.lora_r > 0:
            if self.lora_alpha <= 0:
                found.append(f"lora_alpha must be positive, got {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                found.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            known = set(TARGET_SHORTCUTS) | set(TARGET_SHORTCUTS["all"])
            unknown = [t for t in self.lora_targets.split(",") if t.strip() and t.strip() not in known]
            if unknown or not self.lora_targets.strip():
                found.append(f"lora_targets {self.lora_targets!r} must list some of {', '.join(sorted(known))}")
        return found


def disable_dropout(model: GPT) -> None:
    """Set the dropout of every layer of `model`, and of its config, to 0."""
    model.config.dropout = 0.0
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            module.dropout = 0.0


def batch_logprobs(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (2B,) reply log-probs, summed per sequence, and the (2B,) reply token counts
    of a micro-batch from `collate_pairs`, packed or not, already on the model's device."""
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["reply_mask"],
                             position_ids=batch["position_ids"], segments=batch["segments"])


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class Reference:
    """Sequence log-probs of the frozen starting policy.

    With a plain GPT it keeps a frozen copy. With a PeftModel it runs the policy
    itself with the adapters disabled and dropout off, so no weights are copied.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.copy: GPT | None = None
        if not is_peft_model(policy):
            self.copy = copy.deepcopy(policy).requires_grad_(False).eval()

    def to(self, device: torch.device) -> "Reference":
        if self.copy is not None:
            self.copy.to(device)
        return self

    def num_parameters(self) -> int:
        """Parameters held for the reference beyond the policy's own: 0 with LoRA."""
        return sum(p.numel() for p in self.copy.parameters()) if self.copy is not None else 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        """Return the (2B,) reply log-probs of a micro-batch already on the model's device."""
        if self.copy is not None:
            return batch_logprobs(self.copy, batch)[0]
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return batch_logprobs(self.policy, batch)[0]
        finally:
            self.policy.train(was_training)


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_statistics(model: nn.Module, reference: Reference, loss_fn: Callable[..., torch.Tensor], beta: float,
                   average: bool, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the (B,) losses of one micro-batch and its metrics as sums over pairs (see the module docstring).

    The sums hold every name of METRICS plus "kl_sum" and "chosen_tokens", the two parts
    of kl/chosen_per_token.
    """
    batch = batch_to(batch, next(model.parameters()).device)
    reference_sums = reference(batch)  # (2B,), no gradient
    policy_sums, counts = batch_logprobs(model, batch)
    policy, ref = policy_sums, reference_sums
    if average:
        policy, ref = policy_sums / counts.clamp(min=1), reference_sums / counts.clamp(min=1)
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = ref.chunk(2)
    losses = loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected)

    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen - reference_chosen)
        rejected_rewards = beta * (policy_rejected - reference_rejected)
        B = chosen_rewards.size(0)
        values = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.sum(),
            "logps/rejected": policy_rejected.sum(),
            "kl_sum": (policy_sums[:B] - reference_sums[:B]).sum(),
            "chosen_tokens": counts[:B].sum(),
        }
        # One transfer for all of them: each .item() would wait for the device on its own.
        numbers = torch.stack([value.double() for value in values.values()]).tolist()
    return losses, dict(zip(values, numbers))


def make_loss_fn(reference: Reference, loss_fn: Callable[..., torch.Tensor], beta: float,
                 average: bool) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, int, dict[str, float]]]:
    """Build the Trainer's loss function: it returns the sum of the pair losses of a micro-batch,
    its number of pairs, and the metrics as means over the pairs."""

    def dpo_loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, float]]:
        losses, sums = dpo_statistics(model, reference, loss_fn, beta, average, batch)
        n = batch["n_pairs"]
        metrics = {name: sums[name] / n for name in METRICS}
        metrics["kl/chosen_per_token"] = sums["kl_sum"] / max(sums["chosen_tokens"], 1)
        return losses.sum(), n, metrics

    return dpo_loss_fn


@torch.no_grad()
def evaluate_pairs(model: nn.Module, reference: Reference, loss_fn: Callable[..., torch.Tensor], beta: float,
                   average: bool, heldout: PairBatches, max_batches: int) -> dict[str, float]:
    """Compute val_loss and the val_ metrics over the first max_batches held-out micro-batches."""
    totals: dict[str, float] = {}
    loss_sum, count = 0.0, 0
    for batch in heldout.in_order(max_batches):
        losses, sums = dpo_statistics(model, reference, loss_fn, beta, average, batch)
        loss_sum += losses.sum().item()
        count += batch["n_pairs"]
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + value
    if not count:
        return {}
    results = {"val_loss": loss_sum / count}
    results.update({f"val_{name}": totals[name] / count for name in METRICS})
    results["val_kl/chosen_per_token"] = totals["kl_sum"] / max(totals["chosen_tokens"], 1)
    return results


def dpo_flops_per_token(model: GPT, n_trainable: int, seq_len: int, lora: bool) -> float:
    """Estimate the training FLOPs per token: the policy's forward and backward plus the reference's forward.

    Full training: 6 per weight for the policy and 2 for the reference. LoRA: 4 per
    frozen weight (forward and input gradient), 2 for the reference pass, 6 per adapter
    weight. Attention scores count 12 * n_layer * n_embd * seq_len for the policy and a
    third of that for the reference. The output layer counts at every position,
    although it runs only on reply tokens, so this overestimates.
    """
    attention = 12 * model.config.n_layer * model.config.n_embd * seq_len
    weights = (model.flops_per_token(seq_len) - attention) / 6
    if lora:
        return 6 * weights + 6 * n_trainable + attention * 4 / 3
    return 8 * weights + attention * 4 / 3


def check_resume(out_dir: Path, lora: dict | None) -> None:
    """Raise ValueError when the run saved in `out_dir` had other LoRA settings."""
    path = out_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        return  # no model.json beside the resume state, so no LoRA settings to compare
    saved = json.loads(path.read_text(encoding="utf-8")).get("dpo") or {}
    if "lora" in saved and saved["lora"] != lora:
        raise ValueError(f"cannot resume from {out_dir}: its {MODEL_CONFIG_FILE} records LoRA settings "
                         f"{saved['lora']}, and this run has {lora}; resume with the saved lora_r, lora_alpha and "
                         f"lora_targets, or start a new out_dir")


def train(cfg: DPOConfig) -> dict:
    """Align `cfg.policy` on `cfg.data` and write the checkpoint; return the Trainer's summary.

    Raises:
        ValueError: an invalid config, bad data, an out_dir that is the policy folder, or a
            resume whose LoRA settings differ from the saved run.
        FileNotFoundError: the policy checkpoint or one of its files is missing.
        NotImplementedError: LoRA with train.fsdp.
    """
    problems = cfg.problems() + cfg.data.problems()
    if problems:
        raise ValueError("invalid dpo config:\n  " + "\n  ".join(problems))
    distributed.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    policy_dir = check_checkpoint_dir(cfg.policy)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else policy_dir.parent / "dpo"
    if out_dir.resolve() == policy_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the policy checkpoint folder, which training would overwrite; "
                         "set out_dir to another folder")
    if cfg.lora_r and cfg.train.fsdp:
        raise NotImplementedError("LoRA with train.fsdp is not supported: the adapters are small enough to "
                                  "replicate, so use DDP (train.fsdp=false)")
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets} if cfg.lora_r else None
    record = {"policy": str(policy_dir), "loss": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
              "data": cfg.data.source, "lora": lora}
    if cfg.train.resume:
        require_resume_state(out_dir)
        check_resume(out_dir, lora)

    tokenizer_file = policy_dir / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = load_model(policy_dir)
    if cfg.disable_dropout:
        disable_dropout(model)
    data = prepare_pairs(cfg.data, tokenizer, model.config.block_size, str(policy_dir))
    gpt = model
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    reference = Reference(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s parameters, %s trainable (%s); reference: %s", f"{gpt.num_parameters():,}",
                f"{n_trainable:,}", f"LoRA r={cfg.lora_r} on {cfg.lora_targets}" if cfg.lora_r else "full",
                f"frozen copy, {reference.num_parameters():,} parameters" if reference.copy is not None
                else "the policy with its adapters disabled (no copy)")
    logger.info("loss: %s, beta %g%s", cfg.loss, cfg.beta,
                f", label_smoothing {cfg.label_smoothing}" if cfg.loss == "cdpo" else "")

    batches = PairBatches(data.train, cfg.train.batch_size, cfg.data.seed, rank=distributed.rank(),
                          world_size=distributed.world_size(), pack=cfg.pack)
    heldout = PairBatches(data.heldout, cfg.train.batch_size, cfg.data.seed, pack=cfg.pack) if data.heldout else None
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    loss_fn = preference_loss(cfg.loss, cfg.beta, cfg.label_smoothing)
    average = PREFERENCE_LOSSES[cfg.loss].average_logps

    def evaluate(m: nn.Module) -> dict[str, float]:
        if heldout is None:
            return {}
        return evaluate_pairs(m, reference, loss_fn, cfg.beta, average, heldout, cfg.train.eval_batches)

    def save(m: nn.Module, step: int) -> None:
        meta = {"stage": "dpo", **record}
        if is_peft_model(m):
            save_adapter(m, out_dir / ADAPTER_DIR, policy_dir)
            meta["adapter"] = ADAPTER_DIR
            m = merge_adapter(copy.deepcopy(m))
        save_model(m, out_dir, tokenizer_file=tokenizer_file, step=step, extra={"dpo": meta})

    hooks = Hooks(loss_fn=make_loss_fn(reference, loss_fn, cfg.beta, average), evaluate=evaluate, save=save,
                  tokens_per_batch=lambda batch: batch["n_tokens"],
                  flops_per_token=dpo_flops_per_token(gpt, n_trainable, data.block_size, bool(cfg.lora_r)))
    trainer = Trainer(model, cfg.train, out_dir, batches, hooks)
    reference.to(trainer.device)
    summary = trainer.run()
    if distributed.is_main():
        plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"{cfg.loss} {out_dir.parent.name}",
                  ylabel=f"{cfg.loss} loss (per pair)", extra=("rewards/accuracies", "kl/chosen_per_token"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logger.info("checkpoint: %s%s", out_dir, f" (adapter in {out_dir / ADAPTER_DIR})" if cfg.lora_r else "")
    return summary
