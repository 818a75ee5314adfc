"""Checkpoint folders: weights, model config, tokenizer and resume state.

A checkpoint folder contains

    model.safetensors   weights (safetensors, no pickled code)
    model.json          the ModelConfig and the step the weights are from
    tokenizer.json      the tokenizer the model was trained with
    config.yaml         the resolved stage config (written by the stage)
    train_state.pt      resume state: weights, optimizer, step, RNG and data position

Every file is written to a temporary name in the same folder and renamed into
place, so a process killed at any moment leaves each file either old or new,
never partial. The resume state is one file that holds its own copy of the
weights, so the state a run resumes from is always self-consistent even when
the kill fell between two renames.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.files import atomic_write, atomic_write_text
from gpt.model import GPT, ModelConfig

MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
STAGE_CONFIG_FILE = "config.yaml"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


def _state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """Return the model's tensors without the tied output weight, contiguous and on the CPU."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_model(model: GPT, out_dir: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
               step: int | None = None, extra: dict | None = None) -> None:
    """Write model.json, model.safetensors and, when given, a copy of tokenizer.json to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "step": step, **(extra or {})}
    atomic_write_text(out_dir / MODEL_CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    state = _state_dict_for_saving(model)
    atomic_write(out_dir / MODEL_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (out_dir / TOKENIZER_FILE).resolve():
        atomic_write(out_dir / TOKENIZER_FILE, lambda tmp: shutil.copyfile(tokenizer_file, tmp))


def save_train_state(out_dir: str | os.PathLike, state: dict) -> None:
    """Write the resume state. It must hold only tensors and plain Python values, so that it
    loads with torch.load(weights_only=True)."""
    atomic_write(Path(out_dir) / TRAIN_STATE_FILE, lambda tmp: torch.save(state, tmp))


def check_checkpoint_dir(ckpt_dir: str | os.PathLike, need: tuple[str, ...] = (MODEL_FILE, MODEL_CONFIG_FILE, TOKENIZER_FILE)) -> Path:
    """Return the folder as a Path, or raise FileNotFoundError naming every missing file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(ckpt_dir)!r} does not exist; pass the folder a stage wrote, "
                                f"for example runs/NAME/pretrain")
    missing = [name for name in need if not (ckpt_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {str(ckpt_dir)!r} is missing {', '.join(missing)}; "
                                f"it is incomplete or not a gptlab checkpoint: rerun the stage that writes it "
                                f"(with --resume to continue a killed run)")
    return ckpt_dir


def read_model_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the stage that writes this checkpoint") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{path} has no 'model' field; it was not written by gptlab")
    return meta


def load_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPT:
    """Load a GPT from a checkpoint folder (weights through safetensors only)."""
    ckpt_dir = check_checkpoint_dir(ckpt_dir, need=(MODEL_FILE, MODEL_CONFIG_FILE))
    config = ModelConfig.from_dict(read_model_meta(ckpt_dir)["model"])
    model = GPT(config)
    state = read_safetensors(ckpt_dir / MODEL_FILE)
    load_weights(model, state, source=str(ckpt_dir / MODEL_FILE))
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, raising a ValueError that names it when it is damaged or cut short."""
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} cannot be read ({error}): the file is damaged or incomplete. Rerun the "
                         "stage that wrote it, or resume that stage from its last checkpoint") from None


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, raising a ValueError that lists missing, unexpected and
    mis-shaped tensors."""
    expected = _state_dict_for_saving(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{name}: {tuple(state[name].shape)} != {tuple(t.shape)}"
                   for name, t in expected.items() if name in state and state[name].shape != t.shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"weights in {source} do not match model.json: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong_shape}")
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def require_resume_state(ckpt_dir: str | os.PathLike) -> Path:
    """Return the path of the resume state in `ckpt_dir`, raising FileNotFoundError when it is missing.

    Stages call it before loading their data, so a --resume with nothing to resume fails at once.
    """
    path = Path(ckpt_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no resume state {path}; a run can resume only from a folder where it saved a "
                                f"checkpoint (drop --resume to start fresh)")
    return path


def load_train_state(ckpt_dir: str | os.PathLike) -> dict:
    path = require_resume_state(ckpt_dir)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as error:
        # A cut-short zip archive. The stages write it atomically, so it was most likely
        # copied or edited in part.
        raise ValueError(f"{path} cannot be read ({error}); the resume state is damaged. Delete it and start "
                         "fresh without --resume, or use another out_dir") from None
