"""Measure the bf16 matmul peak of this machine and the pretraining step of a preset
in float32 eager, bf16 eager and bf16 compiled, and print tokens/s and MFU of each.

    python benchmarks/bench_pretrain.py [--preset cpu] [--steps 8] [--out FILE.json]

The steps run the real training step (gpt.training.Trainer.train_step) on random
token ids: the speed of a step does not depend on the token values. MFU here is
against the *measured* bf16 peak of square matmuls, the ceiling a step can reach
on this device.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from gpt.config import build_config
from gpt.device import measure_matmul_peak, resolve_device
from gpt.model import GPT
from gpt.training import Hooks, Trainer
from gptlab.presets import get_preset
from pretrain.train import PretrainConfig, next_token_loss


class RandomBatches:
    def __init__(self, vocab_size: int, batch_size: int, block_size: int) -> None:
        self.shape, self.vocab_size = (batch_size, block_size), vocab_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            tokens = torch.randint(0, self.vocab_size, (self.shape[0], self.shape[1] + 1), generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def measure_steps(cfg: PretrainConfig, dtype: str, compile: bool, steps: int, warmup: int) -> dict:
    cfg.train.dtype, cfg.train.compile, cfg.train.device = dtype, compile, "cpu"
    torch.manual_seed(0)
    model = GPT(cfg.model)
    batches = RandomBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.block_size)
    hooks = Hooks(loss_fn=next_token_loss, tokens_per_batch=lambda b: b[0].numel())
    trainer = Trainer(model, cfg.train, "/tmp/gptlab-bench-unused", batches, hooks)
    batch_iter = iter(batches)
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(batch_iter)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batch_iter)
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]  # the median resists other load on a shared machine
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    return {"dtype": dtype, "compile": compile, "step_ms": 1000 * step_s, "tok_per_s": tokens / step_s,
            "flops_per_token": model.flops_per_token(), "warmup_s": warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="pretrain preset to measure (default: cpu)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = resolve_device("cpu")
    peak = {name: measure_matmul_peak(device, dtype, size=2048, seconds=2.0)
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    cfg = build_config(PretrainConfig, presets=[get_preset("pretrain", args.preset)])
    rows = []
    for dtype, compile in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        row = measure_steps(build_config(PretrainConfig, presets=[get_preset("pretrain", args.preset)]), dtype,
                            compile, args.steps, args.warmup)
        row["mfu_vs_bf16_peak"] = row["flops_per_token"] * row["tok_per_s"] / peak["bfloat16"]
        rows.append(row)

    print(f"\nmachine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"matmul peak (2048x2048): float32 {peak['float32'] / 1e12:.3f} TFLOP/s, "
          f"bfloat16 {peak['bfloat16'] / 1e12:.3f} TFLOP/s")
    m = cfg.model
    print(f"preset {args.preset}: n_layer {m.n_layer}, n_embd {m.n_embd}, block_size {m.block_size}, "
          f"batch {cfg.train.batch_size}x{cfg.train.grad_accum}, vocab {m.vocab_size}\n")
    print("| variant | ms/step | tokens/s | MFU (vs measured bf16 peak) |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        name = f"{row['dtype']} {'compiled' if row['compile'] else 'eager'}"
        print(f"| {name} | {row['step_ms']:.0f} | {row['tok_per_s']:,.0f} | {100 * row['mfu_vs_bf16_peak']:.1f}% |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"peak_flops": peak, "preset": args.preset, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
