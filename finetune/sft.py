"""Supervised fine-tuning (`gptlab sft`): teach a pretrained GPT to write assistant replies in the chat template.

    gptlab sft base=runs/NAME/pretrain                      # full fine-tuning -> runs/NAME/sft
    gptlab sft base=runs/NAME/pretrain lora_r=16 train.lr=1e-3

Conversations are loaded and mixed (`gpt.sft_data`), some are held out, and each is
rendered by the chat template and fitted into block_size tokens. The loss covers
only what the assistant writes: the target at position t is ids[t+1] where the chat
mask of t+1 is 1, and -100 (no loss) elsewhere.

With `pack` (the default), several conversations share one row of block_size
tokens. A block-diagonal causal mask keeps them from attending to each other and
their position ids restart at 0, so a packed row computes the losses of its
conversations run one by one (equal up to float rounding). Without packing, each
row contains one conversation, right-padded to the longest of its micro-batch.

The output folder is a normal checkpoint (model.safetensors, model.json,
tokenizer.json, config.yaml, metrics.jsonl, loss.png, train_state.pt). With LoRA
(lora_r > 0) it also contains adapter/, the adapter in PEFT's format for the
transformers export of the base (see gpt/lora.py), and model.safetensors contains the
base weights with the adapter merged in, so that sample, chat, export and the
later stages read the folder like any other checkpoint.

Limits: LoRA does not run with train.fsdp. A packed row attends with a boolean
(B, 1, T, T) mask, which rules out the flash attention kernel.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from gpt import distributed
from gpt.chat import render_prompt, stop_token_ids
from gpt.checkpoint import (MODEL_CONFIG_FILE, TOKENIZER_FILE, check_checkpoint_dir, load_model, require_resume_state,
                            save_model)
from gpt.config import option, save_config
from gpt.generate import SamplingParams, generate
from gpt.lora import TARGET_SHORTCUTS, add_lora, is_peft_model, merge_adapter, save_adapter
from gpt.model import GPT, packed_attention_mask
from gpt.sft_data import DEFAULT_NAMES, fit_conversations, load_mix, parse_mix, split_heldout
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer, plot_loss

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (ids, chat mask) of one fitted conversation
DEFAULT_MIX = "gpteacher:0.5,chitchat,taskmaster4:0.5,identity:5"
ADAPTER_DIR = "adapter"


def sft_train_defaults() -> TrainConfig:
    # Fine-tuning starts from trained weights: a lower peak rate than pretraining, a short
    # warmup, and no weight decay, which would pull the weights toward zero rather than
    # toward the base model.
    return TrainConfig(batch_size=8, max_steps=1000, lr=3e-4, warmup_steps=20, weight_decay=0.0,
                       eval_interval=100, eval_batches=10, checkpoint_interval=200)


@dataclass
class SFTConfig:
    """Configuration of `gptlab sft`."""

    base: str = option("", "checkpoint folder of the model to fine-tune, for example runs/NAME/pretrain")
    out_dir: str = option("", "folder to write the fine-tuned checkpoint to; empty for the folder sft beside base (runs/NAME/pretrain -> runs/NAME/sft)")
    data: str = option(DEFAULT_MIX, "chat data: a source (catalog name, file, folder, glob or Hub dataset) or a mix SOURCE[:WEIGHT],...; a weight below 1 takes that share of the source, above 1 repeats it")
    name: str | None = option(None, f"assistant name for {{{{name}}}} placeholders in the identity set; none for {DEFAULT_NAMES['name']!r}")
    author: str | None = option(None, f"author for {{{{author}}}} placeholders in the identity set; none for {DEFAULT_NAMES['author']!r}")
    max_examples: int = option(0, "read at most this many conversations from each source, in file order; 0 reads all")
    heldout_fraction: float = option(0.02, "share of the conversations held out for the validation loss (val_loss)")
    block_size: int = option(0, "maximum tokens per training row; 0 for the base model's block_size, which is also the maximum")
    pack: bool = option(True, "pack several conversations into each row, kept apart by a block-diagonal attention mask; false pads each conversation to the longest of its micro-batch")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight (full fine-tuning). LoRA usually wants a higher train.lr, about 1e-3")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapters' updates are scaled by lora_alpha / lora_r")
    lora_dropout: float = option(0.05, "dropout probability on the input of each LoRA adapter during training")
    lora_targets: str = option("all", "comma-separated projections that get LoRA adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or the shortcuts attention, mlp, all")
    train: TrainConfig = field(default_factory=sft_train_defaults, metadata={"help": "optimization"})
    eval_prompts: str = option("Who are you?|Give me three tips for staying healthy.|Can I get a large latte, please?", "user messages answered (greedy decoding) and logged at each evaluation, separated by |; empty for none")
    eval_tokens: int = option(64, "maximum tokens of each logged reply")
    seed: int = option(1337, "seed of the data: mix subsets, the held-out split and the order of rows (train.seed seeds LoRA initialization and dropout)")

    def names(self) -> dict[str, str] | None:
        """Placeholder values the user set, or None to leave the defaults to the loader."""
        if self.name is None and self.author is None:
            return None
        return {"name": self.name or DEFAULT_NAMES["name"], "author": self.author or DEFAULT_NAMES["author"]}

    def problems(self) -> list[str]:
        found = []
        if not self.base:
            found.append("base is empty; pass the checkpoint folder to fine-tune, for example base=runs/NAME/pretrain")
        try:
            parse_mix(self.data)
        except ValueError as error:
            found.append(str(error))
        if self.max_examples < 0:
            found.append(f"max_examples must be 0 (all) or more, got {self.max_examples}")
        if not 0 <= self.heldout_fraction < 1:
            found.append(f"heldout_fraction must be in [0, 1), for example 0.02, got {self.heldout_fraction}")
        if self.block_size < 0:
            found.append(f"block_size must be 0 (the base model's) or a positive number of tokens, got {self.block_size}")
        if self.lora_r < 0:
            found.append(f"lora_r must be 0 (full fine-tuning) or a positive rank, got {self.lora_r}")
        if self.lora_r > 0:
            if self.lora_alpha <= 0:
                found.append(f"lora_alpha must be positive, got {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                found.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            known = set(TARGET_SHORTCUTS) | set(TARGET_SHORTCUTS["all"])
            unknown = [t for t in self.lora_targets.split(",") if t.strip() and t.strip() not in known]
            if unknown or not self.lora_targets.strip():
                found.append(f"lora_targets {self.lora_targets!r} must list some of {', '.join(sorted(known))}")
        if self.eval_tokens < 0:
            found.append(f"eval_tokens must be 0 or more, got {self.eval_tokens}")
        return found


# ---------------------------------------------------------------------------
# Rows and micro-batches


def example_targets(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """Compute the next-token targets of one example: ids[t+1] where mask[t+1] is 1, else -100.

    The last position has no next token, so its target is -100 too.
    """
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def pack_rows(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Group examples into rows of at most block_size tokens (best-fit decreasing).

    Each example, longest first, goes to the row whose free space it fills most
    tightly, or opens a new row. Returns the example indices of each row.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            space, row = block_size - lengths[index], len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            space -= lengths[index]
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


def collate(rows: Sequence[Sequence[Example]], pack: bool) -> dict[str, Any]:
    """Build one micro-batch from rows of examples, padded on the right to the longest row.

    Returns:
        input_ids (B, T), targets (B, T) with -100 where there is no loss,
        attention_mask, position_ids, n_tokens (real tokens) and n_targets. Packed:
        attention_mask is a boolean (B, 1, T, T) block-diagonal causal mask and
        position_ids (B, T) restart at 0 for each example. Otherwise every row must
        hold one example, attention_mask is (B, T) with 0 on padding, and
        position_ids is None.
    """
    assert pack or all(len(row) == 1 for row in rows), "without packing a row holds one example"
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    B = len(rows)
    input_ids = torch.zeros(B, T, dtype=torch.long)  # padding id 0 is never attended to by real tokens
    targets = torch.full((B, T), -100, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # -1 marks padding
    for b, row in enumerate(rows):
        start = 0
        for index, (ids, mask) in enumerate(row):
            end = start + len(ids)
            input_ids[b, start:end] = torch.tensor(ids)
            targets[b, start:end] = torch.tensor(example_targets(ids, mask))
            positions[b, start:end] = torch.arange(len(ids))
            segments[b, start:end] = index
            start = end
    batch = {"input_ids": input_ids, "targets": targets, "n_tokens": int((segments >= 0).sum()),
             "n_targets": int((targets != -100).sum())}
    if pack:
        batch["attention_mask"] = packed_attention_mask(segments)  # (B, 1, T, T)
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (segments >= 0).long()
        batch["position_ids"] = None
    return batch


class ChatBatches:
    """Micro-batches of rows of fitted conversations, each epoch in a new order drawn from (seed, epoch).

    The rows are fixed once (packed or one example each); epochs permute them. The
    state is the number of rows the whole job has consumed, so a resumed run, even
    with a different number of processes, continues with the same rows.
    """

    def __init__(self, examples: Sequence[Example], block_size: int, batch_size: int, seed: int, pack: bool,
                 rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise ValueError("ChatBatches needs at least one example, got none")
        self.examples, self.batch_size, self.seed, self.pack = list(examples), batch_size, seed, pack
        self.rank, self.world_size = rank, world_size
        lengths = [len(ids) for ids, _ in self.examples]
        self.rows = pack_rows(lengths, block_size) if pack else [[i] for i in range(len(lengths))]
        self.consumed = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def _row(self, position: int) -> list[Example]:
        epoch, offset = divmod(position, len(self.rows))
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.rows), generator=generator).tolist()
            self._order_epoch = epoch
        return [self.examples[i] for i in self.rows[self._order[offset]]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            start = self.consumed + self.rank * self.batch_size
            rows = [self._row(start + i) for i in range(self.batch_size)]
            self.consumed += self.batch_size * self.world_size
            yield collate(rows, self.pack)

    def in_order(self, max_batches: int) -> Iterator[dict[str, Any]]:
        """Yield the first max_batches micro-batches of the rows in their fixed order (for evaluation)."""
        for start in range(0, min(len(self.rows), max_batches * self.batch_size), self.batch_size):
            rows = self.rows[start:start + self.batch_size]
            yield collate([[self.examples[i] for i in row] for row in rows], self.pack)


def sft_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Sum of the token losses of a micro-batch and its number of targets, for the Trainer."""
    device = next(model.parameters()).device
    position_ids = batch["position_ids"]
    out = model(batch["input_ids"].to(device), batch["targets"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=position_ids.to(device) if position_ids is not None else None,
                loss_reduction="sum")
    return out.loss, batch["n_targets"], {}


# ---------------------------------------------------------------------------
# The stage


def resolve_block_size(requested: int, base_block_size: int, base_dir: Path) -> int:
    """Return the row length: `requested`, or the base's block_size when it is 0.

    Raises:
        ValueError: `requested` is above the base's block_size; the message names both.
    """
    if requested > base_block_size:
        raise ValueError(f"block_size {requested} is larger than the base model's block_size {base_block_size} "
                         f"({base_dir / MODEL_CONFIG_FILE}); use block_size={base_block_size} or less, or 0 for "
                         f"the base's")
    return requested or base_block_size


def load_examples(cfg: SFTConfig, tokenizer: Tokenizer, block_size: int) -> tuple[list[Example], list[Example]]:
    """Load, mix, split and fit the conversations; log their counts. Returns (train, heldout) examples."""
    conversations = load_mix(cfg.data, seed=cfg.seed, split="train", names=cfg.names(),
                             max_examples=cfg.max_examples)
    train_conversations, heldout_conversations = split_heldout(conversations, cfg.heldout_fraction, cfg.seed)
    train_fit = fit_conversations(tokenizer, train_conversations, block_size)
    heldout_fit = fit_conversations(tokenizer, heldout_conversations, block_size)
    if not train_fit.examples:
        raise ValueError(f"no training conversation fits block_size {block_size}: all {train_fit.dropped} were "
                         f"dropped because their first exchange is longer; raise block_size or choose other data")
    tokens = sum(len(ids) for ids, _ in train_fit.examples)
    trained = sum(sum(mask) for _, mask in train_fit.examples)
    logger.info("data: %s conversations from %s; %s train, %s held out (%s of them fit block_size)",
                f"{len(conversations):,}", cfg.data, f"{len(train_conversations):,}",
                f"{len(heldout_conversations):,}", f"{len(heldout_fit.examples):,}")
    logger.info("train examples at block_size %d: %s kept, %s truncated (lost turns from the end), %s dropped "
                "(first exchange too long); %s tokens, %s trained tokens (%.1f%%)", block_size,
                f"{len(train_fit.examples):,}", f"{train_fit.truncated:,}", f"{train_fit.dropped:,}", f"{tokens:,}",
                f"{trained:,}", 100 * trained / max(tokens, 1))
    return train_fit.examples, heldout_fit.examples


def prepare_model(cfg: SFTConfig, model: GPT, block_size: int) -> tuple[GPT | PeftModel, float]:
    """Add LoRA adapters when lora_r > 0 and log the parameter counts.

    Returns:
        (the model to train, its training FLOPs per token at block_size).
    """
    flops = model.flops_per_token(block_size)
    if cfg.lora_r:
        attention = 12 * model.config.n_layer * model.config.n_embd * block_size
        frozen_weights = (flops - attention) / 6
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.lora_r:
        # A frozen weight costs 4 FLOPs per token (forward and input gradient, but no weight
        # gradient), an adapter weight 6, and attention is unchanged.
        flops = 4 * frozen_weights + 6 * n_trainable + attention
    logger.info("model: %s parameters, %s trainable (%s)", f"{sum(p.numel() for p in model.parameters()):,}",
                f"{n_trainable:,}", f"LoRA r={cfg.lora_r} on {cfg.lora_targets}" if cfg.lora_r else "full fine-tuning")
    return model, flops


def train(cfg: SFTConfig) -> dict:
    """Fine-tune `cfg.base` on chat data and write the checkpoint; return the Trainer's summary.

    Raises:
        ValueError: invalid data, a block_size above the base's, an out_dir that is the
            base folder, or a resume whose settings differ from the saved run.
        FileNotFoundError: the base checkpoint or one of its files is missing.
        NotImplementedError: LoRA with train.fsdp, or packing with ALiBi.
    """
    problems = cfg.problems()  # build_config checks these too, but train() may be called directly
    if problems:
        raise ValueError("invalid sft config:\n  " + "\n  ".join(problems))
    distributed.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    base_dir = check_checkpoint_dir(cfg.base)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else base_dir.parent / "sft"
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the base checkpoint folder, which fine-tuning would "
                         f"overwrite; set out_dir to another folder")
    if cfg.lora_r and cfg.train.fsdp:
        raise NotImplementedError("LoRA with train.fsdp is not supported: the adapters are small enough to "
                                  "replicate, so use DDP (train.fsdp=false)")
    record = {"base": str(base_dir), "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets}
              if cfg.lora_r else None}
    if cfg.train.resume:
        require_resume_state(out_dir)
        check_resume(out_dir, record["lora"])

    tokenizer_file = base_dir / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = load_model(base_dir)
    block_size = resolve_block_size(cfg.block_size, model.config.block_size, base_dir)
    train_examples, heldout_examples = load_examples(cfg, tokenizer, block_size)

    model, flops = prepare_model(cfg, model, block_size)
    batches = ChatBatches(train_examples, block_size, cfg.train.batch_size, cfg.seed, cfg.pack,
                          rank=distributed.rank(), world_size=distributed.world_size())
    heldout = (ChatBatches(heldout_examples, block_size, cfg.train.batch_size, cfg.seed, cfg.pack)
               if heldout_examples else None)
    tokens = sum(len(ids) for ids, _ in train_examples)
    logger.info("rows: %s of at most %d tokens (%s), %.0f%% filled; %.2f epochs in %d steps",
                f"{len(batches.rows):,}", block_size, "packed" if cfg.pack else "one conversation each",
                100 * tokens / (len(batches.rows) * block_size),
                cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum / len(batches.rows),
                cfg.train.max_steps)

    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    prompts = [p.strip() for p in cfg.eval_prompts.split("|") if p.strip()] if cfg.eval_tokens else []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        gpt = m.get_base_model() if is_peft_model(m) else m
        results = evaluate_loss(gpt, heldout, cfg.train.eval_batches) if heldout is not None else {}
        for prompt, reply in zip(prompts, sample_replies(gpt, tokenizer, prompts, cfg.eval_tokens)):
            logger.info("reply to %s: %s", json.dumps(prompt), json.dumps(reply))
        return results

    def save(m: torch.nn.Module, step: int) -> None:
        meta = {"stage": "sft", **record}
        if is_peft_model(m):
            save_adapter(m, out_dir / ADAPTER_DIR, base_dir)
            meta["adapter"] = ADAPTER_DIR
            m = merge_adapter(copy.deepcopy(m))
        save_model(m, out_dir, tokenizer_file=tokenizer_file, step=step, extra={"sft": meta})

    hooks = Hooks(loss_fn=sft_loss, evaluate=evaluate, save=save, tokens_per_batch=lambda batch: batch["n_tokens"],
                  flops_per_token=flops)
    summary = Trainer(model, cfg.train, out_dir, batches, hooks).run()
    if distributed.is_main():
        plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"sft {out_dir.parent.name}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logger.info("checkpoint: %s%s", out_dir, f" (adapter in {out_dir / ADAPTER_DIR})" if cfg.lora_r else "")
    return summary


def check_resume(out_dir: Path, lora: dict | None) -> None:
    """Raise ValueError when the run saved in `out_dir` had other LoRA settings, whose
    resume state would not fit this model."""
    path = out_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        return  # no model.json beside the resume state, so no LoRA settings to compare
    saved = json.loads(path.read_text(encoding="utf-8")).get("sft") or {}
    if "lora" in saved and saved["lora"] != lora:
        raise ValueError(f"cannot resume from {out_dir}: its {MODEL_CONFIG_FILE} records LoRA settings "
                         f"{saved['lora']}, and this run has {lora}; resume with the saved lora_r, lora_alpha and "
                         f"lora_targets, or start a new out_dir")


@torch.no_grad()
def evaluate_loss(model: GPT, heldout: ChatBatches, max_batches: int) -> dict[str, float]:
    """Mean loss per target token over the first max_batches micro-batches of held-out rows."""
    loss_sum, count = 0.0, 0
    for batch in heldout.in_order(max_batches):
        loss, n_targets, _ = sft_loss(model, batch)
        loss_sum += loss.item()
        count += n_targets
    return {"val_loss": loss_sum / count} if count else {}


def sample_replies(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to single user messages, ending at the chat template's stop tokens."""
    if not prompts:
        return []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    ids = [render_prompt(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]
    return [completion.text for completion in generate(model, ids, params, tokenizer=tokenizer)]
