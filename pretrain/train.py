"""Causal language-model pretraining: raw text to a base model in one command.

`train(cfg)` trains the tokenizer (or reuses the run's), tokenizes the corpus
into shards (or reuses them), then trains a GPT on random windows of the
training shards and writes the checkpoint to `OUT_DIR/pretrain`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt import distributed
from gpt.checkpoint import read_model_meta, save_model
from gpt.config import option, save_config
from gpt.model import GPT, ModelConfig
from gpt.shards import TokenShards
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer, plot_loss
from pretrain.prepare import DataConfig, prepare_run

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Configuration of `gptlab pretrain`."""

    out_dir: str = option("runs/default", "run folder: tokenizer.json, data/ (token shards) and pretrain/ (the checkpoint) are written here")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model architecture"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "corpus and tokenizer"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})
    sample_prompts: str = option("Once upon a time|The little dog", "prompts sampled at each evaluation, separated by |; empty for none")
    sample_tokens: int = option(48, "new tokens per evaluation sample")

    def problems(self) -> list[str]:
        found = []
        if not self.out_dir:
            found.append("out_dir must be a folder path, got an empty string")
        if self.sample_tokens < 0:
            found.append(f"sample_tokens must be 0 or more, got {self.sample_tokens}")
        return found


class WindowSampler:
    """Micro-batches of random non-overlapping windows of block_size + 1 tokens.

    Windows start at multiples of block_size; each epoch visits all of them in a
    new order drawn from (seed, epoch). The state is the number of windows the
    whole job has consumed, so a resumed run, even with a different number of
    processes, continues with the same windows.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, source: str = "") -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // block_size
        needed = batch_size * world_size
        if self.n_windows < needed:
            raise ValueError(
                f"the training corpus {source} has {len(tokens):,} tokens, fewer than one batch of {needed} windows of "
                f"{block_size + 1} tokens ({needed * (block_size + 1):,} tokens); add text, or lower train.batch_size "
                f"or model.block_size")
        self.consumed = 0
        self._order_epoch = -1
        self._order = None

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def _window_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_windows)
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.n_windows, generator=generator).numpy()
            self._order_epoch = epoch
        return int(self._order[offset])

    def __iter__(self):
        T = self.block_size
        while True:
            start = self.consumed + self.rank * self.batch_size
            rows = [self._window_index(start + i) for i in range(self.batch_size)]
            self.consumed += self.batch_size * self.world_size
            chunk = np.stack([self.tokens[i * T: i * T + T + 1] for i in rows]).astype(np.int64)
            batch = torch.from_numpy(chunk)
            yield batch[:, :-1], batch[:, 1:]


def next_token_loss(model, batch):
    x, y = batch
    device = next(model.parameters()).device
    out = model(x.to(device), y.to(device), loss_reduction="sum")
    return out.loss, y.numel(), {}


@torch.no_grad()
def evaluate_bits_per_byte(model: GPT, tokens: np.ndarray, bytes_per_token: float, block_size: int,
                           batch_size: int, max_batches: int) -> dict[str, float]:
    """Loss in nats per token and bits per byte over consecutive validation windows.

    Bits per byte = summed loss / ln 2 / bytes of the evaluated text, with the bytes
    taken pro rata from the split's byte count, which makes it comparable across
    tokenizers.
    """
    device = next(model.parameters()).device
    n_windows = min((len(tokens) - 1) // block_size, batch_size * max_batches)
    if n_windows == 0:
        return {}
    loss_sum, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        chunk = np.stack([tokens[i * block_size: i * block_size + block_size + 1] for i in rows]).astype(np.int64)
        batch = torch.from_numpy(chunk).to(device)
        out = model(batch[:, :-1], batch[:, 1:], loss_reduction="sum")
        loss_sum += out.loss.item()
        count += batch[:, 1:].numel()
    loss = loss_sum / count
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}


def train(cfg: PretrainConfig) -> dict:
    ckpt_dir = Path(cfg.out_dir) / "pretrain"
    if cfg.train.resume and not (ckpt_dir / "train_state.pt").exists():
        raise FileNotFoundError(f"nothing to resume: {ckpt_dir / 'train_state.pt'} does not exist; drop --resume "
                                f"to start a new run")
    distributed.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    with distributed.main_first():  # rank 0 trains the tokenizer and writes the shards; the others reuse them
        tokenizer, tokenizer_path, meta = prepare_run(cfg.data, cfg.out_dir)
    cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.train.resume:
        saved = ModelConfig.from_dict(read_model_meta(ckpt_dir)["model"])
        changed = [f"model.{name}: saved {value!r}, now {getattr(cfg.model, name)!r}"
                   for name, value in saved.to_dict().items() if getattr(cfg.model, name) != value]
        if changed:
            raise ValueError(f"cannot resume from {ckpt_dir}: the model config differs from its model.json "
                             f"({'; '.join(changed)}); resume with the saved settings, or start a new out_dir")
    model = GPT(cfg.model)
    train_tokens = TokenShards(Path(cfg.out_dir) / "data", "train").tokens
    val_tokens = TokenShards(Path(cfg.out_dir) / "data", "val").tokens
    batches = WindowSampler(train_tokens, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed,
                            rank=distributed.rank(), world_size=distributed.world_size(),
                            source=str(Path(cfg.out_dir) / "data"))
    val_meta = meta["splits"]["val"]
    bytes_per_token = val_meta["bytes"] / max(val_meta["tokens"], 1)

    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size  # global, all processes
    logger.info("model: %s parameters (%s without embeddings), %.3g FLOPs per token",
                f"{model.num_parameters():,}", f"{model.num_parameters(exclude_embeddings=True):,}",
                model.flops_per_token())
    logger.info("data: %s training tokens, %s validation tokens; %s tokens per step (%d x %d x %d); "
                "%.2f epochs in %d steps", f"{len(train_tokens):,}", f"{len(val_tokens):,}", f"{tokens_per_step:,}",
                cfg.train.batch_size, cfg.train.grad_accum, cfg.model.block_size,
                tokens_per_step * cfg.train.max_steps / len(train_tokens), cfg.train.max_steps)

    if distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, ckpt_dir / "config.yaml")
    prompts = [p for p in cfg.sample_prompts.split("|") if p.strip()] if cfg.sample_tokens else []

    def evaluate(m: GPT) -> dict[str, float]:
        results = evaluate_bits_per_byte(m, val_tokens, bytes_per_token, cfg.model.block_size,
                                         cfg.train.batch_size, cfg.train.eval_batches)
        for prompt in prompts:
            logger.info("sample: %s", json.dumps(sample_text(m, tokenizer, prompt, cfg.sample_tokens)))
        return results

    hooks = Hooks(
        loss_fn=next_token_loss,
        evaluate=evaluate,
        save=lambda m, step: save_model(m, ckpt_dir, tokenizer_file=tokenizer_path, step=step),
        tokens_per_batch=lambda batch: batch[0].numel(),
        flops_per_token=model.flops_per_token(),
    )
    trainer = Trainer(model, cfg.train, ckpt_dir, batches, hooks)
    summary = trainer.run()
    if distributed.is_main():
        plot_loss(ckpt_dir / "metrics.jsonl", ckpt_dir / "loss.png", title=f"pretrain {Path(cfg.out_dir).name}")
        (ckpt_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        logger.info("checkpoint: %s", ckpt_dir)
    return summary


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Sample a continuation of `prompt` at temperature 0.8 with a fixed seed, for progress logs."""
    from gpt.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0,
                            stop_token_ids=[tokenizer.eot_id])
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    completion = generate(model, [ids], params, tokenizer=tokenizer)[0]
    return prompt + completion.text
