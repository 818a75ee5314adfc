"""Compare the generation engine (gpt.generate) with `transformers`' `generate` on the same weights.

    python benchmarks/bench_generate.py [--prompt-len 64] [--new-tokens 128] [--repeats 3] [--layout gpt2] [--out FILE.json]

The model has the size of the `cpu` pretraining preset (n_layer 6, n_head 4, n_embd 256,
block_size 256, vocab_size 8192) in the gpt2 layout, or with --layout llama in the llama
layout (RoPE, RMSNorm, SwiGLU). Its weights are random, because the time of a forward pass
does not depend on the values of the weights or of the token ids. The same model is exported
with gpt.hf.to_hf_model (a GPT2LMHeadModel or a LlamaForCausalLM) and both decode the
same random prompts greedily, to exactly --new-tokens tokens (no end-of-text stop), at
batch 1 and batch 8. Batch prompts all have the same length, so neither side pads.

Each side is timed generating 1 token (time to first token: prefill plus one sampling
step) and generating --new-tokens tokens. Decoding speed is the extra tokens divided by
the extra time, B * (new_tokens - 1) / (t_all - t_first), so it excludes the prefill.
Runs alternate between the two sides and the median of --repeats runs is reported,
which damps the noise of a shared machine. Rows: float32 weights; bfloat16 weights;
and float32 weights under bfloat16 autocast (the engine's `dtype` argument, and
torch.autocast around transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time

import torch
import transformers

from gpt.generate import SamplingParams, generate
from gpt.hf import to_hf_model
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import SPECIAL_TOKENS

CPU_PRESET = dict(vocab_size=8192, n_layer=6, n_head=4, n_embd=256, block_size=256)


# Replaced by time.thread_time under --clock cpu.
clock = time.perf_counter


def time_ours(model: GPT, prompts: list[list[int]], new_tokens: int,
              autocast_dtype: torch.dtype | None) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=[])
    start = clock()
    completions = generate(model, prompts, params, dtype=autocast_dtype)
    return clock() - start, [c.tokens for c in completions]


def time_transformers(hf_model, prompts: list[list[int]], new_tokens: int,
                      autocast_dtype: torch.dtype | None) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    start = clock()
    with torch.inference_mode(), context:
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=SPECIAL_TOKENS.index("<|pad|>"))
    return clock() - start, out[:, ids.size(1):].tolist()


def measure(name: str, ours: GPT, theirs, batch: int, args, autocast_dtype: torch.dtype | None) -> dict:
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(len(SPECIAL_TOKENS), CPU_PRESET["vocab_size"], (batch, args.prompt_len),
                            generator=generator).tolist()
    # Warm-up: the first calls allocate buffers and pick kernels.
    time_ours(ours, prompts, 4, autocast_dtype)
    time_transformers(theirs, prompts, 4, autocast_dtype)
    times = {key: [] for key in ("ours_first", "ours_all", "hf_first", "hf_all")}
    for _ in range(args.repeats):
        times["ours_first"].append(time_ours(ours, prompts, 1, autocast_dtype)[0])
        times["hf_first"].append(time_transformers(theirs, prompts, 1, autocast_dtype)[0])
        seconds, our_tokens = time_ours(ours, prompts, args.new_tokens, autocast_dtype)
        times["ours_all"].append(seconds)
        seconds, their_tokens = time_transformers(theirs, prompts, args.new_tokens, autocast_dtype)
        times["hf_all"].append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    extra_tokens = batch * (args.new_tokens - 1)
    row = {
        "dtype": name, "batch": batch,
        "ours_tok_s": extra_tokens / (median["ours_all"] - median["ours_first"]),
        "hf_tok_s": extra_tokens / (median["hf_all"] - median["hf_first"]),
        "ours_ttft_ms": 1000 * median["ours_first"],
        "hf_ttft_ms": 1000 * median["hf_first"],
        # Lower precision can flip near-tied greedy choices, so only float32 must match exactly.
        "same_tokens": our_tokens == their_tokens,
    }
    row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
    row["ttft_speedup"] = row["hf_ttft_ms"] / row["ours_ttft_ms"]
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| dtype | batch | ours tok/s | transformers tok/s | speedup | ours TTFT ms | transformers TTFT ms | TTFT speedup | same tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['ours_ttft_ms']:.1f} | {r['hf_ttft_ms']:.1f} | {r['ttft_speedup']:.2f}x | {r['same_tokens']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16,autocast", help="rows to run: float32, bfloat16 (weights), autocast (bfloat16 autocast over float32 weights)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time with torch's default threads; cpu: CPU time of the one thread "
                             "that computes (torch.set_num_threads(1)), which other processes on a busy machine "
                             "disturb far less")
    parser.add_argument("--layout", choices=["gpt2", "llama"], default="gpt2",
                        help="model layout: gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)")
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    if args.clock == "cpu":
        global clock
        torch.set_num_threads(1)
        clock = time.thread_time
    if args.prompt_len + args.new_tokens > CPU_PRESET["block_size"]:
        parser.error(f"--prompt-len plus --new-tokens must be at most block_size {CPU_PRESET['block_size']}")

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_layout(args.layout, **CPU_PRESET)).eval()
    models = {
        "float32": (model, to_hf_model(model).eval(), None),
        "bfloat16": (copy.deepcopy(model).to(torch.bfloat16), to_hf_model(model).to(torch.bfloat16).eval(), None),
        "autocast": (model, to_hf_model(model).eval(), torch.bfloat16),
    }
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {args.layout} layout, {model.num_parameters() / 1e6:.1f}M parameters, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}, {args.clock} clock")
    rows = []
    for name in args.dtypes.split(","):
        ours, theirs, autocast_dtype = models[name]
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(name, ours, theirs, batch, args, autocast_dtype))
            print(f"  {name} batch {batch}: {rows[-1]['speedup']:.2f}x", flush=True)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
