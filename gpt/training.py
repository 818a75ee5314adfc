"""The training loop every stage shares: optimizer, learning-rate schedule, gradient
accumulation by target count, mixed precision, evaluation, logging and checkpoints.

A stage supplies a `TrainConfig`, a model, a source of micro-batches and a loss
function returning the *sum* of its losses with the number of targets they
cover. The loop adds the sums of every micro-batch of an optimizer step and
divides the gradients by the total count once, so a step over several
micro-batches of different lengths equals one step over their union.

Limitations: with `max_time` the schedule follows wall time, so such a run does
not repeat step for step; use `max_steps` for exact reproducibility.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gpt import distributed
from gpt.config import option
from gpt.device import autocast, peak_flops, resolve_device, resolve_dtype, synchronize

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of the optimization loop, shared by every training stage."""

    batch_size: int = option(16, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step over all processes, which share them under torchrun; the global batch is batch_size * grad_accum")
    max_steps: int = option(1000, "number of optimizer steps (an upper bound when max_time is set)")
    max_time: float = option(0.0, "training time budget in seconds, 0 for none; the schedule then follows elapsed time")
    lr: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "learning-rate schedule after warmup: cosine decay, warmup-stable-decay, or constant")
    warmup_steps: int = option(50, "steps of linear warmup from 0 to lr")
    decay_fraction: float = option(0.2, "wsd only: share of the run, at its end, spent decaying linearly to the final rate")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to matrices only (not to biases and norm weights)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    optimizer: Literal["adamw", "lion", "muon"] = option("adamw", "adamw; lion (Chen et al. 2023: uses beta1 and beta2, and wants lr about 3-10x lower and weight_decay 3-10x higher than adamw); or muon (Jordan et al. 2024: orthogonalized momentum for the weight matrices inside the blocks, adamw for the rest, both at lr)")
    grad_clip: float = option(1.0, "maximum global gradient norm, 0 to disable clipping")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "compute precision: auto picks bfloat16 where the device has native support; weights stay float32")
    compile: bool = option(False, "compile the model with torch.compile (slower start, faster steps)")
    fsdp: bool = option(False, "under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) instead of replicating them (DDP)")
    eval_interval: int = option(100, "evaluate every N steps and at the end, 0 for only at the end")
    eval_batches: int = option(20, "micro-batches per evaluation")
    log_interval: int = option(1, "write a log line and a metrics.jsonl record every N steps")
    checkpoint_interval: int = option(200, "save a checkpoint every N steps and at the end")
    seed: int = option(1337, "random seed for initialization, data order and dropout")
    resume: bool = option(False, "continue from the resume state in the output folder")
    peak_tflops: float = option(0.0, "peak TFLOP/s used for MFU; 0 looks the GPU up in a table or measures the device's matmul peak")

    def problems(self) -> list[str]:
        found = []
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                found.append(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_time", "warmup_steps", "eval_interval", "grad_clip", "weight_decay", "peak_tflops"):
            if getattr(self, name) < 0:
                found.append(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            found.append(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            found.append(f"train.min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            found.append(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("log_interval", "checkpoint_interval", "eval_batches"):
            if getattr(self, name) < 1:
                found.append(f"train.{name} must be at least 1, got {getattr(self, name)}")
        return found


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Build the optimizer that `cfg.optimizer` names, with weight decay on matrices only.

    Biases and norm gains are not decayed, because Loshchilov and Hutter 2019 define decay
    per weight and decaying gains only shrinks them. Lion and Muon are in gpt/optim.py.

    Raises:
        NotImplementedError: muon with parameters sharded by FSDP2.
    """
    if cfg.optimizer == "muon":
        from gpt.optim import build_muon

        return build_muon(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lion":
        from gpt.optim import Lion

        return Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`, where `progress` in [0, 1] is the share of the run done."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        if progress < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - min_lr) * (progress - decay_start) / cfg.decay_fraction
    # Cosine from the end of warmup to the end of the run.
    warm = cfg.warmup_steps / cfg.max_steps if cfg.max_time == 0 else 0.0
    frac = (progress - warm) / max(1.0 - warm, 1e-9)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


class LossFn(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | int, dict[str, float]]:
        """Return (sum of losses, number of targets, extra metrics) for one micro-batch.

        Every micro-batch must return the same extra metric names, because under torchrun
        they are summed over the processes by name.
        """


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Hooks:
    """Callbacks a stage plugs into the loop."""

    loss_fn: LossFn
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    save: Callable[[nn.Module, int], None] | None = None  # writes the stage's weights for `step`
    tokens_per_batch: Callable[[Any], int] = lambda batch: 0  # input tokens, for tok/s and MFU
    flops_per_token: float = 0.0


def shard_model(model: nn.Module) -> None:
    """Shard parameters, gradients and optimizer state over the processes with FSDP2: each
    transformer block is one unit, gathered just before it runs and freed after."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Trainer:
    """Runs the optimization loop of one stage and writes metrics.jsonl and checkpoints to `out_dir`.

    Under torchrun the model is wrapped in DistributedDataParallel, or sharded with
    FSDP2 when `fsdp` is set; each process runs grad_accum / world_size
    micro-batches per step, and only rank 0 evaluates, logs and writes files.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | os.PathLike, batches: BatchSource,
                 hooks: Hooks) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        distributed.setup(cfg.device)
        self.world_size = distributed.world_size()
        self.is_main = distributed.is_main()
        if cfg.grad_accum % self.world_size:
            raise ValueError(f"train.grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes "
                             f"({self.world_size}), so that the global batch stays batch_size * grad_accum; "
                             f"set train.grad_accum to a multiple of {self.world_size}")
        self.local_accum = cfg.grad_accum // self.world_size
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", distributed.local_rank())
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = model.to(self.device)
        self.sharded = cfg.fsdp and self.world_size > 1
        if self.sharded:
            shard_model(self.model)
        self.batches = batches
        self.hooks = hooks
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.elapsed = 0.0  # training seconds, carried over a resume
        self.tokens_seen = 0
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        if self.world_size > 1 and not self.sharded:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=device_ids)
        self.peak = None

    # Resume state -----------------------------------------------------------------------
    def train_state(self) -> dict:
        """Gather the whole resume state on every process (a collective under torchrun).

        Weights and optimizer state are keyed by parameter name, so a state saved by
        a sharded or replicated job resumes in a job of any size.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "model": get_model_state_dict(self.model, options=options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
            "data": self.batches.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_train_state(self, state: dict) -> None:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.elapsed, self.tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]

    # The loop ---------------------------------------------------------------------------
    def progress(self) -> float:
        if self.cfg.max_time > 0:
            return max(self.step / self.cfg.max_steps, self.elapsed / self.cfg.max_time)
        return self.step / self.cfg.max_steps

    def done(self) -> bool:
        return self.step >= self.cfg.max_steps or (self.cfg.max_time > 0 and self.elapsed >= self.cfg.max_time)

    def _sync_gradients(self, enabled: bool):
        """Context for one micro-batch: gradients are all-reduced only on the window's last one."""
        if self.sharded:
            self.model.set_requires_gradient_sync(enabled)
        elif isinstance(self.forward_model, DistributedDataParallel) and not enabled:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batch_iter: Iterator[Any]) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches (across all processes); return its metrics."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.progress(), self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, targets, input tokens
        extras: dict[str, float] = {}
        for micro in range(self.local_accum):
            batch = next(batch_iter)
            with self._sync_gradients(micro == self.local_accum - 1):
                with autocast(self.device, self.dtype):
                    micro_loss, micro_count, micro_extras = self.hooks.loss_fn(self.forward_model, batch)
                micro_loss.backward()
            totals[0] += micro_loss.detach().double()
            totals[1] += micro_count
            totals[2] += self.hooks.tokens_per_batch(batch)
            for key, value in micro_extras.items():
                extras[key] = extras.get(key, 0.0) + float(value)
        distributed.all_reduce_sum(totals)
        loss_sum, count, tokens = totals.tolist()
        if count == 0:
            raise ValueError(f"step {self.step}: no targets in {cfg.grad_accum} micro-batches; every example is "
                             f"masked out, so check the data and its loss mask")
        # Each process summed its losses, and the all-reduce averaged the gradients over
        # processes. Scaling by world_size / count then gives the gradient of the mean over
        # every target of the window, the same as one batch that contains all micro-batches.
        scale = self.world_size / count
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if isinstance(gnorm, DTensor):
            gnorm = gnorm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": loss_sum / count, "lr": lr, "gnorm": gnorm.item(), "tokens": int(tokens)}
        # Extra metrics are averaged over the micro-batches of every process, so that rank 0
        # logs the same values as one process running the whole global batch.
        extras = distributed.all_reduce_sums(extras, self.device)
        metrics.update({key: value / cfg.grad_accum for key, value in extras.items()})
        return metrics

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        if cfg.resume:
            from gpt.checkpoint import load_train_state
            self.load_train_state(load_train_state(self.out_dir))
            logger.info("resumed at step %d from %s", self.step, self.out_dir)
            if self.is_main:
                _truncate_metrics(metrics_path, self.step)
        elif metrics_path.exists() and self.is_main:
            logger.warning("%s already contains a run. Starting over replaces its checkpoint and metrics at the "
                           "first save. Stop now and pass --resume to continue it, or use another out_dir",
                           self.out_dir)
            metrics_path.unlink()
        distributed.barrier()
        if self.hooks.flops_per_token and self.is_main:
            self.peak = peak_flops(self.device, self.dtype, cfg.peak_tflops)

        batch_iter = iter(self.batches)
        step_times: list[float] = []
        last_eval: dict[str, float] = {}
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        show_bar = self.is_main and os.environ.get("GPTLAB_NO_PROGRESS") != "1"
        bar = tqdm(total=None if cfg.max_time > 0 else cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if show_bar else True)  # None: shown only on a terminal
        metrics_file = open(metrics_path, "a", encoding="utf-8") if self.is_main else None
        with logging_redirect_tqdm():
            while not self.done():
                synchronize(self.device)
                t0 = time.perf_counter()
                metrics = self.train_step(batch_iter)
                synchronize(self.device)
                dt = time.perf_counter() - t0
                # Every process follows rank 0's clock, so all agree on the schedule and the stop.
                self.elapsed = distributed.broadcast_float(self.elapsed + dt, self.device)
                self.step += 1
                self.tokens_seen += metrics["tokens"]
                step_times.append(dt)
                record = self._step_record(metrics, dt)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss became {metrics['loss']} at step {self.step}; lower train.lr or "
                                             f"check the data (the last checkpoint in {self.out_dir} is intact)")
                is_last = self.done()
                evaluated = cfg.eval_interval and self.step % cfg.eval_interval == 0 or is_last
                if evaluated:
                    last_eval = self._evaluate()
                    record.update(last_eval)
                if metrics_file and (self.step % cfg.log_interval == 0 or is_last or evaluated):
                    logger.info(self._log_line(record))
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if self.step % cfg.checkpoint_interval == 0 or is_last:
                    self.save()
        bar.close()
        if metrics_file:
            metrics_file.close()
        return self._summary(step_times, last_eval)

    def save(self) -> None:
        """Write the stage's weights and the resume state (rank 0 writes; every rank gathers)."""
        from gpt.checkpoint import save_train_state

        state = self.train_state()
        if self.is_main:
            if self.hooks.save is not None:
                self.hooks.save(self._unsharded_model(state["model"]), self.step)
            save_train_state(self.out_dir, state)
        distributed.barrier()

    def _unsharded_model(self, full_state: dict) -> nn.Module:
        """Return the model with whole tensors: itself, or for a sharded run a CPU copy from `full_state`."""
        if not self.sharded:
            return self.model
        copy = type(self.model)(self.model.config)
        copy.load_state_dict(full_state)
        return copy

    def _evaluate(self) -> dict[str, float]:
        # A sharded model runs forward passes only with every process taking part, so all
        # of them evaluate. Rank 0 alone evaluates a replicated one.
        if self.hooks.evaluate is None or not (self.is_main or self.sharded):
            return {}
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            results = self.hooks.evaluate(self.model)
        self.model.train()
        return results

    def _step_record(self, metrics: dict[str, float], dt: float) -> dict[str, Any]:
        tok_per_s = metrics["tokens"] / dt if dt > 0 else 0.0
        record: dict[str, Any] = {"step": self.step, "loss": metrics["loss"], "lr": metrics["lr"],
                                  "gnorm": metrics["gnorm"], "ms": dt * 1000, "tok_per_s": tok_per_s}
        if self.peak:
            record["mfu"] = self.hooks.flops_per_token * tok_per_s / self.peak
        remaining = self.cfg.max_steps - self.step
        eta = remaining * (self.elapsed / max(self.step, 1))
        if self.cfg.max_time > 0:
            eta = min(eta, max(self.cfg.max_time - self.elapsed, 0.0))
        record["eta_s"] = eta
        record["elapsed_s"] = self.elapsed
        record["tokens_seen"] = self.tokens_seen
        record.update({k: v for k, v in metrics.items() if k not in record and k != "tokens"})
        return record

    def _log_line(self, r: dict[str, Any]) -> str:
        if self.cfg.max_time > 0:  # the time budget ends the run, so progress is a share of it
            where = f"step {r['step']} ({100 * self.progress():.1f}% of {format_duration(self.cfg.max_time)})"
        else:
            where = f"step {r['step']}/{self.cfg.max_steps} ({100 * self.progress():.1f}%)"
        parts = [where, f"loss {r['loss']:.4f}",
                 f"lr {r['lr']:.2e}", f"gnorm {r['gnorm']:.2f}", f"{r['ms']:.0f} ms", f"{r['tok_per_s']:,.0f} tok/s"]
        if "mfu" in r:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"eta {format_duration(r['eta_s'])}")
        standard = {"step", "loss", "lr", "gnorm", "ms", "tok_per_s", "mfu", "eta_s", "elapsed_s", "tokens_seen"}
        for key, value in r.items():
            if key not in standard:
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " | ".join(parts)

    def _summary(self, step_times: list[float], last_eval: dict[str, float]) -> dict[str, float]:
        # The first steps include compilation and allocator warm-up, so they are left out.
        steady = step_times[min(len(step_times) // 5, 10):] or step_times or [0.0]
        step_ms = 1000 * sum(steady) / len(steady)
        summary = {"steps": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                   "steady_step_ms": step_ms, **last_eval}
        if self.elapsed > 0:
            summary["tok_per_s"] = self.tokens_seen / self.elapsed
        if self.device.type == "cuda":
            summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        else:
            import resource
            summary["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        logger.info("done: %d steps in %s | steady %.0f ms/step | %s tok/s | peak memory %.2f GB", self.step,
                    format_duration(self.elapsed), step_ms, f"{summary.get('tok_per_s', 0):,.0f}",
                    summary["peak_memory_gb"])
        return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step`: the steps a killed run logged past its last checkpoint are redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
    from gpt.checkpoint import atomic_write_text
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_loss(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "",
              ylabel: str = "loss (nats per token)", extra: Sequence[str] = ()) -> None:
    """Draw training loss per step, and validation loss where evaluated, to a PNG.

    Args:
        metrics_path: the run's metrics.jsonl.
        out_path: the PNG to write.
        title: the figure title.
        ylabel: what the loss is, with its unit.
        extra: names of further logged metrics (such as "accuracy"), each drawn in a
            panel of its own beside the loss: the training value per step and the
            "val_" value where evaluated. A metric absent from the file is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    panels = [("loss", ylabel)] + [(name, name) for name in extra
                                   if any(name in r or f"val_{name}" in r for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 + 4 * (len(panels) - 1), 4), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels):
        steps = [r for r in records if name in r]
        x, y = [r["step"] for r in steps], [r[name] for r in steps]
        # Per-step values of small batches are noisy: past 50 steps draw them faint, under
        # their mean over a centered window of about a 25th of the run (a trailing window
        # would lag behind the curve).
        half = len(steps) // 50
        if half > 0:
            ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8)
            sums = [0.0, *itertools.accumulate(y)]
            bounds = [(max(0, i - half), min(len(y), i + half + 1)) for i in range(len(y))]
            means = [(sums[hi] - sums[lo]) / (hi - lo) for lo, hi in bounds]
            ax.plot(x, means, color="tab:blue", linewidth=1.5, label=f"train {name}, mean of {2 * half + 1} steps")
        elif steps:
            ax.plot(x, y, color="tab:blue", linewidth=1, label=f"train {name}")
        evals = [r for r in records if f"val_{name}" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[f"val_{name}"] for r in evals], "o-", color="tab:orange",
                    label=f"validation {name}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
