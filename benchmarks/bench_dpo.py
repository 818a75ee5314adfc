"""Time one DPO training step of gptlab against TRL's DPOTrainer on the same model and pairs,
with full training and with LoRA, and count the parameters each holds for its reference.

    GPTLAB_DATA_DIR=DATA_KIT_FOLDER python benchmarks/bench_dpo.py [--steps 10] [--threads 1] [--out FILE.json]

Both sides start from one GPT (gpt2 layout, float32 on the CPU): ours trains it directly,
TRL loads the transformers folder that `gpt.hf.save_hf_folder` exports from it. The pairs
are the first hh-rlhf harmless-base pairs that fit block_size whole (no shortened prompt,
no cut reply), or made-up pairs without the data kit. TRL tokenizes them with the same
chat template, and the script checks that its token ids equal ours. Both
use AdamW, gradient clipping at 1.0, dropout off, no gradient checkpointing, and compute
the reference log-probs on the fly (a frozen copy for full training, the policy with its
adapters disabled for LoRA).

Ours runs with packed rows, as `gptlab dpo` does by default, and once more unpacked
(each sequence padded to the longest of its batch, as TRL's default collator does).
A step is timed around `Trainer.train_step` (ours, batch collation included) and
between TRL's on_step_begin and on_step_end callbacks (data loading excluded), after
warmup steps. Each is reported as the median wall time and the median CPU time of the
process (all its threads), which other jobs on a shared machine disturb less.

Limits: wall times on a shared machine vary from run to run, so compare the columns
of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpt.chat import CHAT_TEMPLATE
from gpt.hf import load_hf_tokenizer, save_hf_folder
from gpt.lora import add_lora
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer
from rlhf.dpo import Reference, make_loss_fn
from rlhf.losses import preference_loss
from rlhf.pair_batches import PairBatches, fit_pair
from rlhf.preference_data import load_pairs
from rlhf.preference_formats import PreferencePair

LORA_R = 16


def benchmark_pairs(count: int, block_size: int, tokenizer_vocab: int) -> tuple[list[PreferencePair], Tokenizer]:
    """Pairs that fit block_size whole, and a tokenizer trained on their text."""
    if os.environ.get("GPTLAB_DATA_DIR"):
        pairs, _ = load_pairs("hh-rlhf-harmless")
    else:
        pairs = [PreferencePair([{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                                f"It is {2 * i}. " * (1 + i % 5), f"Maybe {i}? " * (1 + i % 3)) for i in range(400)]
    texts = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokenizer = Tokenizer.train(texts, vocab_size=tokenizer_vocab)
    fitting = []
    for pair in pairs:
        _, shortened, cut = fit_pair(tokenizer, pair, block_size, block_size // 2)
        if not shortened and not cut and pair.chosen.strip() and pair.rejected.strip():
            fitting.append(pair)
        if len(fitting) == count:
            break
    return fitting, tokenizer


def held_parameters(*models: torch.nn.Module | None) -> int:
    """Distinct parameter tensors across the models (a shared or tied tensor counts once)."""
    seen = {}
    for model in models:
        if model is not None:
            for p in model.parameters():
                seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def time_ours(base: GPT, tokenized: list, args: argparse.Namespace, lora: bool, pack: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    if lora:
        model = add_lora(model, LORA_R, 2 * LORA_R, 0.0, "all")
    reference = Reference(model)
    hooks = Hooks(loss_fn=make_loss_fn(reference, preference_loss("dpo", 0.1), 0.1, average=False),
                  tokens_per_batch=lambda batch: batch["n_tokens"])
    cfg = TrainConfig(batch_size=args.batch_size, max_steps=10**6, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                      device="cpu", dtype="float32", eval_interval=0, checkpoint_interval=10**6)
    batches = PairBatches(tokenized, args.batch_size, seed=0, pack=pack)
    trainer = Trainer(model, cfg, tempfile.mkdtemp(prefix="ours-", dir=args.work_dir), batches, hooks)
    batch_iter = iter(batches)
    wall, cpu = [], []
    for step in range(args.warmup + args.steps):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step(batch_iter)
        if step >= args.warmup:
            wall.append(time.perf_counter() - wall_start)
            cpu.append(time.process_time() - cpu_start)
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "parameters_held": held_parameters(model, reference.copy)}


def time_trl(hf_dir: Path, pairs: list[PreferencePair], tokenized: list, args: argparse.Namespace, lora: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.wall, self.cpu, self.start = [], [], (0.0, 0.0)

        def on_step_begin(self, *_, **__):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *_, **__):
            self.wall.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])

    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                                  "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-", dir=args.work_dir),
                       per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                       weight_decay=0.0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
                       max_length=args.block_size, use_cpu=True, bf16=False, fp16=False,
                       gradient_checkpointing=False, precompute_ref_log_probs=False, disable_dropout=True,
                       report_to="none", save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
                       seed=0)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                             target_modules=["c_attn", "c_proj", "c_fc"]) if lora else None
    timer = StepTimer()
    trainer = DPOTrainer(model=str(hf_dir), args=config, train_dataset=dataset,
                         processing_class=load_hf_tokenizer(hf_dir / "tokenizer.json", model_max_length=args.block_size,
                                                            chat_template=CHAT_TEMPLATE),
                         peft_config=peft_config, callbacks=[timer])
    first = trainer.train_dataset[0]
    same_tokens = (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) == (
        tokenized[0].prompt, tokenized[0].chosen, tokenized[0].rejected)
    trainer.train()
    return {"step_s": statistics.median(timer.wall[args.warmup:]), "cpu_s": statistics.median(timer.cpu[args.warmup:]),
            "parameters_held": held_parameters(trainer.model, trainer.ref_model), "same_tokens": same_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0 keeps torch's default. On a machine shared with other jobs, 1 "
                             "avoids threads waiting on each other")
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("GPTLAB_NO_PROGRESS", "1")

    pairs, tokenizer = benchmark_pairs(args.batch_size * (args.warmup + args.steps), args.block_size, args.vocab_size)
    tokenized = [fit_pair(tokenizer, pair, args.block_size, args.block_size // 2)[0] for pair in pairs]
    torch.manual_seed(0)
    config = ModelConfig.from_layout("gpt2", vocab_size=tokenizer.vocab_size, n_layer=args.n_layer,
                                     n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    model = GPT(config)
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    args.work_dir = str(work)
    tokenizer.save(work / "tokenizer.json")
    save_hf_folder(model, work / "tokenizer.json", work / "hf", chat_template=CHAT_TEMPLATE)
    tokens = sum(len(t.prompt) * 2 + len(t.chosen) + len(t.rejected) for t in tokenized) / len(tokenized)
    print(f"model: {model.num_parameters():,} parameters ({args.n_layer} layers, n_embd {args.n_embd}, vocab "
          f"{tokenizer.vocab_size}); {len(pairs)} pairs, {tokens:.0f} tokens per pair on average; batch "
          f"{args.batch_size} pairs; {torch.get_num_threads()} threads")

    results = {}
    for lora in (False, True):
        name = f"LoRA r={LORA_R}" if lora else "full"
        results[name] = {"ours": time_ours(model, tokenized, args, lora, pack=True),
                         "ours_unpacked": time_ours(model, tokenized, args, lora, pack=False),
                         "trl": time_trl(work / "hf", pairs, tokenized, args, lora)}

    print("\n| training | ours (packed): wall / CPU s per step | ours unpacked | TRL | TRL / ours, wall | "
          "TRL / ours, CPU | parameters held, ours | parameters held, TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        ours, unpacked, trl = result["ours"], result["ours_unpacked"], result["trl"]
        print(f"| {name} | {ours['step_s']:.3f} / {ours['cpu_s']:.3f} | {unpacked['step_s']:.3f} / "
              f"{unpacked['cpu_s']:.3f} | {trl['step_s']:.3f} / {trl['cpu_s']:.3f} | "
              f"{trl['step_s'] / ours['step_s']:.2f}x | {trl['cpu_s'] / ours['cpu_s']:.2f}x | "
              f"{ours['parameters_held']:,} | {trl['parameters_held']:,} |")
    print(f"\npolicy parameters: {model.num_parameters():,}; TRL tokenized the first pair as we do: "
          f"{all(r['trl']['same_tokens'] for r in results.values())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
