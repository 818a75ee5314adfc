"""The export stage (`gptlab export`): write a checkpoint folder as a Hugging Face
`transformers` folder.

The folder contains config.json, model.safetensors, generation_config.json and the
tokenizer files, and loads offline with `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`. Only models in the gpt2 or llama layout
export (see gpt/hf.py); other architectures stop with NotImplementedError
before any weights are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt.checkpoint import MODEL_CONFIG_FILE, TOKENIZER_FILE, check_checkpoint_dir, load_model, read_model_meta
from gpt.config import option
from gpt.hf import export_layout, save_hf_folder
from gpt.model import ModelConfig

logger = logging.getLogger(__name__)

FORMATS = ("hf",)


@dataclass
class ExportConfig:
    """Settings of `gptlab export`."""

    checkpoint: str = option("", "checkpoint folder to export, with model.safetensors, model.json and tokenizer.json (for example runs/NAME/sft)")
    out_dir: str = option("", "folder to write the export to, created if missing; empty for CHECKPOINT/hf")
    format: Literal["hf"] = option("hf", "export format: hf, a transformers folder (config.json, model.safetensors, tokenizer files)")

    def problems(self) -> list[str]:
        found = []
        if not self.checkpoint:
            found.append("checkpoint is empty. Pass the checkpoint folder to export, for example checkpoint=runs/NAME/sft")
        if self.format not in FORMATS:
            found.append(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        return found


def run(cfg: ExportConfig) -> Path:
    """Export the checkpoint `cfg.checkpoint` to `cfg.out_dir` and return the output folder.

    Raises:
        ValueError: an invalid config, or an output folder that is the checkpoint folder itself.
        FileNotFoundError: the checkpoint folder or one of its files is missing.
        NotImplementedError: the model's layout has no transformers counterpart.
    """
    problems = cfg.problems()  # build_config checks these too, but run() may be called directly
    if problems:
        raise ValueError("invalid export config:\n  " + "\n  ".join(problems))
    ckpt_dir = check_checkpoint_dir(cfg.checkpoint)
    meta = read_model_meta(ckpt_dir)
    model_config = ModelConfig.from_dict(meta["model"])
    if "reward_model" in meta:
        # The reward head has no place in a causal LM folder.
        logger.warning("%s is a reward model: the export contains its trunk as a causal language model, without "
                       "the reward head (reward_head.safetensors), so it cannot score conversations", ckpt_dir)
    try:
        layout = export_layout(model_config)
    except NotImplementedError as error:
        raise NotImplementedError(f"cannot export {ckpt_dir / MODEL_CONFIG_FILE}: {error}") from None

    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_dir / "hf"
    if out_dir.resolve() == ckpt_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the checkpoint folder, whose model.safetensors and "
                         f"tokenizer.json the export would overwrite. Choose another folder, or leave out_dir "
                         f"empty for {ckpt_dir / 'hf'}")

    model = load_model(ckpt_dir)
    logger.info("exporting %s (%s layout, %s parameters) to %s", ckpt_dir, layout,
                f"{model.num_parameters():,}", out_dir)
    # TODO: pass the chat template (chat_template=...) once the chat stage provides one as Jinja.
    written = save_hf_folder(model, ckpt_dir / TOKENIZER_FILE, out_dir)
    for path in written:
        logger.info("wrote %s (%s bytes)", path, f"{path.stat().st_size:,}")
    logger.info("load it with transformers: AutoModelForCausalLM.from_pretrained(%r) and "
                "AutoTokenizer.from_pretrained(%r)", str(out_dir), str(out_dir))
    return out_dir
