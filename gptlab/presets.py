"""Named presets: partial stage configs, sized by how long a run takes.

`PRESETS[stage][name]` is a nested dict of field values in the same form as a
`--config` YAML file. The command line applies a preset after the field defaults
and before the YAML file and the command-line values, so both can change what a
preset sets.
"""

from __future__ import annotations

import copy
import difflib

PRESETS: dict[str, dict[str, dict]] = {
    "pretrain": {
        # Smoke runs and tests: TinyStories only, a small tokenizer and a 2-layer model;
        # about a minute on two CPU cores, tokenizer training and preparation included.
        "tiny": {
            "data": {"sources": "tinystories", "vocab_size": 2048},
            "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128},
            "train": {"batch_size": 16, "max_steps": 200, "lr": 3e-3, "warmup_steps": 20, "eval_interval": 100,
                      "eval_batches": 10, "checkpoint_interval": 100},
        },
        # The default: a base model worth talking to after 20 minutes on a laptop CPU.
        "cpu": {
            "data": {"sources": "tinystories,gutenberg-children", "vocab_size": 8192},
            "model": {"n_layer": 6, "n_head": 4, "n_embd": 256, "block_size": 256},
            "train": {"batch_size": 16, "grad_accum": 2, "max_steps": 100_000, "max_time": 1200.0, "lr": 2e-3,
                      "warmup_steps": 100,
                      "schedule": "cosine", "compile": True, "eval_interval": 250, "checkpoint_interval": 250},
        },
        # The 124M-parameter GPT-2 layout for one GPU: 0.5M tokens per step, as the GPT-3 paper
        # uses for this size.
        "gpt2-small": {
            "data": {"sources": "tinystories,gutenberg-children", "vocab_size": 32768},
            "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
            "train": {"batch_size": 32, "grad_accum": 16, "max_steps": 5000, "lr": 6e-4, "warmup_steps": 200,
                      "compile": True, "eval_interval": 250, "checkpoint_interval": 500},
        },
        # The 350M-parameter GPT-2 medium layout for several GPUs (add --train.fsdp where one
        # GPU's memory is too small); 0.5M tokens per step.
        "gpt2-medium": {
            "data": {"sources": "tinystories,gutenberg-children", "vocab_size": 32768},
            "model": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
            "train": {"batch_size": 16, "grad_accum": 32, "max_steps": 10000, "lr": 3e-4, "warmup_steps": 500,
                      "compile": True, "eval_interval": 500, "checkpoint_interval": 500},
        },
    },
    # The stages after pretraining, sized to follow the pretrain preset of the same name.
    "sft": {
        "tiny": {"max_examples": 200, "eval_tokens": 24,
                 "train": {"max_steps": 60, "eval_interval": 30, "checkpoint_interval": 30}},
        "cpu": {"train": {"batch_size": 16, "max_steps": 100_000, "max_time": 600.0, "lr": 5e-4, "eval_interval": 200,
                          "checkpoint_interval": 200}},
    },
    "reward": {
        "tiny": {"data": {"max_pairs": 300}, "train": {"max_steps": 30, "eval_interval": 15, "checkpoint_interval": 30}},
        # 400 steps at twice the stage's default rate: 0.672 held-out accuracy on the
        # hh-rlhf harmless pairs from a cpu SFT model, about 4 minutes on two cores.
        "cpu": {"train": {"max_steps": 400, "lr": 1e-4, "eval_interval": 100, "eval_batches": 15}},
    },
    "dpo": {
        "tiny": {"data": {"max_pairs": 300}, "train": {"max_steps": 30, "eval_interval": 15, "checkpoint_interval": 30}},
        "cpu": {"train": {"max_steps": 100_000, "max_time": 300.0, "eval_interval": 100}},
    },
    "ppo": {
        "tiny": {"prompts_per_step": 8, "max_new_tokens": 16, "train": {"max_steps": 4}},
        "cpu": {"train": {"max_steps": 100}},
    },
    "eval": {
        "tiny": {"limit": 16, "max_new_tokens": 32},
        "cpu": {"limit": 500, "max_new_tokens": 128},
    },
    # The whole pipeline: `size` picks the preset of every stage above.
    "run": {
        "tiny": {"size": "tiny", "eval_tasks": ["lm", "arc_easy", "blimp", "chat"]},
        "cpu": {"size": "cpu"},
    },
}


def preset_names(stage: str) -> list[str]:
    """Return the sorted names of the presets defined for `stage` (empty if none)."""
    return sorted(PRESETS.get(stage, {}))


def get_preset(stage: str, name: str) -> dict:
    """Return a copy of the preset `name` of `stage`.

    Raises:
        ValueError: the stage has no preset of that name. The message lists the
            presets it has.
    """
    known = preset_names(stage)
    if name in known:
        return copy.deepcopy(PRESETS[stage][name])
    if not known:
        raise ValueError(f"unknown preset {name!r}: stage {stage!r} has no presets.")
    message = f"unknown preset {name!r} for stage {stage!r}. Known presets: {', '.join(known)}."
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f" Did you mean {close[0]}?"
    raise ValueError(message)
