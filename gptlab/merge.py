"""The merge stage (`gptlab merge`): fold a LoRA adapter into its base model's weights.

    gptlab merge checkpoint=runs/NAME/pretrain adapter=runs/NAME/sft/adapter out_dir=runs/NAME/merged

The result is a normal checkpoint folder (model.safetensors, model.json,
tokenizer.json, config.yaml) that every stage reads without peft. The adapter is
any folder `gpt.lora.load_adapter` reads: one written by `gptlab sft` with LoRA,
or a PEFT LoRA adapter trained in transformers on the export of the same base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gpt.checkpoint import TOKENIZER_FILE, check_checkpoint_dir, load_model, save_model
from gpt.config import option, save_config
from gpt.lora import ADAPTER_CONFIG_FILE, load_adapter, merge_adapter

logger = logging.getLogger(__name__)


@dataclass
class MergeConfig:
    """Settings of `gptlab merge`."""

    checkpoint: str = option("", "checkpoint folder of the base model the adapter was trained on, for example runs/NAME/pretrain")
    adapter: str = option("", "LoRA adapter folder (adapter_config.json, adapter_model.safetensors), for example runs/NAME/sft/adapter")
    out_dir: str = option("", "folder to write the merged checkpoint to; empty for the folder merged beside the adapter folder")

    def problems(self) -> list[str]:
        found = []
        if not self.checkpoint:
            found.append("checkpoint is empty. Pass the base checkpoint folder, for example checkpoint=runs/NAME/pretrain")
        if not self.adapter:
            found.append("adapter is empty. Pass the adapter folder, for example adapter=runs/NAME/sft/adapter")
        return found


def run(cfg: MergeConfig) -> Path:
    """Merge the adapter into the base, write the checkpoint and return its folder.

    Raises:
        ValueError: an invalid config, an adapter that does not load onto the base, or
            an output folder that is the base checkpoint folder.
        FileNotFoundError: the base checkpoint folder or one of its files is missing.
    """
    problems = cfg.problems()  # build_config checks these too, but run() may be called directly
    if problems:
        raise ValueError("invalid merge config:\n  " + "\n  ".join(problems))
    base_dir = check_checkpoint_dir(cfg.checkpoint)
    adapter_dir = Path(cfg.adapter)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else adapter_dir.parent / "merged"
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the base checkpoint folder, whose weights the merge would "
                         f"overwrite; choose another folder")

    recorded = _recorded_base(adapter_dir)
    if recorded and Path(recorded).resolve() != base_dir.resolve():
        logger.warning("adapter %s was saved for the base %s, not %s; merging anyway, since shapes are checked "
                       "but the weights cannot be", adapter_dir, recorded, base_dir)

    model = load_model(base_dir)
    merged = merge_adapter(load_adapter(model, adapter_dir))
    save_model(merged, out_dir, tokenizer_file=base_dir / TOKENIZER_FILE,
               extra={"base": str(base_dir), "merged_adapter": str(adapter_dir)})
    save_config(cfg, out_dir / "config.yaml")
    logger.info("merged %s into %s and wrote %s", adapter_dir, base_dir, out_dir)
    return out_dir


def _recorded_base(adapter_dir: Path) -> str | None:
    """Read base_model_name_or_path from the adapter's config; None when it cannot be read
    (load_adapter then reports the problem)."""
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
