"""LoRA adapters on our GPT through `peft`, saved in PEFT's own format for the
`transformers` model that `gpt.hf` exports.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
equation 3) leaves a linear layer's weight W frozen and trains a low-rank update:
h = W x + s B A x, with A (r, in), B (out, r) and s = lora_alpha / r
(lora_alpha / sqrt(r) with rank-stabilized LoRA). `add_lora` wraps a GPT in a
`peft.PeftModel` whose only trainable parameters are the A and B matrices.

An adapter folder is what `PeftModel.save_pretrained` writes for the
transformers model of the base (`adapter_config.json`, `adapter_model.safetensors`),
so that

    base = AutoModelForCausalLM.from_pretrained(EXPORT)  # gptlab export checkpoint=BASE out_dir=EXPORT
    model = PeftModel.from_pretrained(base, ADAPTER_DIR)

computes the logits of our adapted GPT. Module names map as follows:

    llama  blocks.{i}.attn.{q,k,v,o}_proj     -> model.layers.{i}.self_attn.{q,k,v,o}_proj
           blocks.{i}.mlp.{gate,up,down}_proj -> model.layers.{i}.mlp.{gate,up,down}_proj
    gpt2   blocks.{i}.attn.o_proj -> transformer.h.{i}.attn.c_proj
           blocks.{i}.mlp.up_proj -> transformer.h.{i}.mlp.c_fc
           blocks.{i}.mlp.down_proj -> transformer.h.{i}.mlp.c_proj
           blocks.{i}.attn.{q,k,v}_proj together -> transformer.h.{i}.attn.c_attn

GPT-2's c_attn computes q, k and v in one Conv1D layer (fan_in_fan_out), so the
adapters of our separate projections become one adapter on c_attn. Its A stacks
the A matrices of the targeted projections, so its rank is the sum of theirs. Its
B is block diagonal: each B matrix sits in the output rows of its projection, with
zeros in the other rows. The adapter's lora_alpha grows with the rank so that the
scaling s stays the same. The safetensors header records which projections each
c_attn adapter covers, and `load_adapter` splits it back along them. A c_attn
adapter without that record, or one whose zero blocks were trained in
transformers, loads instead as one shared A on each of q, k and v, each with its
rows of B. That computes the same function at a higher rank.

A model with no transformers counterpart (ALiBi, no positions, ...) gets a PEFT
folder under our own module names, which `load_adapter` reads the same way.

`base_model_name_or_path` in adapter_config.json names the gptlab checkpoint
folder of the base, not a transformers folder, so `AutoPeftModelForCausalLM`
cannot load the adapter alone: export the base and use `PeftModel.from_pretrained`
as above.

Limits: only plain LoRA (bias "none", no DoRA, no modules_to_save). With
lora_dropout, transformers draws one dropout mask for the input of c_attn, and
our q, k and v adapters draw one each. So training differs slightly between the
two, and evaluation does not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt.model import GPT, ModelConfig

# peft and gpt.hf import transformers, which takes seconds: stages import this module at
# start even when they train without LoRA, so the functions that need them import them.
if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGET_SHORTCUTS = {"attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS, "all": ATTENTION_TARGETS + MLP_TARGETS}

# PEFT names every tensor of an adapter by the module path inside PeftModel.
_PEFT_PREFIX = "base_model.model."
# Key of the safetensors header entry that records the projections behind each c_attn adapter.
_QKV_METADATA_KEY = "gptlab_c_attn_parts"
_QKV = ("q_proj", "k_proj", "v_proj")
_GPT2_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}


class LoraWeights(NamedTuple):
    """The adapter of one linear layer: lora_A.weight (r, in), lora_B.weight (out, r) and lora_alpha."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.size(0)


def is_peft_model(model: nn.Module) -> bool:
    """Tell whether `model` is a PeftModel, without importing peft when nothing has."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def resolve_targets(targets: str | Sequence[str], config: ModelConfig) -> list[str]:
    """Expand LoRA target names into the projection names of a model with `config`.

    Args:
        targets: a comma-separated string or a list of names among q_proj, k_proj,
            v_proj, o_proj, gate_proj, up_proj, down_proj, and the shortcuts
            "attention", "mlp" and "all". A shortcut skips gate_proj in a GELU MLP.

    Returns:
        The projection names, without repeats, in the order listed above.

    Raises:
        ValueError: an empty list, an unknown name, or gate_proj in a model whose MLP has none.
    """
    names = [name.strip() for name in (targets.split(",") if isinstance(targets, str) else targets)]
    names = [name for name in names if name]
    if not names:
        raise ValueError("the list of LoRA targets is empty; name projections such as q_proj,v_proj, "
                         "or use attention, mlp or all")
    present = [name for name in TARGET_SHORTCUTS["all"] if name != "gate_proj" or config.mlp == "swiglu"]
    chosen = set()
    for name in names:
        if name in TARGET_SHORTCUTS:
            chosen.update(target for target in TARGET_SHORTCUTS[name] if target in present)
        elif name in present:
            chosen.add(name)
        elif name == "gate_proj":
            raise ValueError(f"LoRA target gate_proj does not exist in a model with mlp={config.mlp!r}, which has no "
                             f"gate projection; choose among {', '.join(present)}")
        else:
            raise ValueError(f"unknown LoRA target {name!r}; choose among {', '.join(present)}, "
                             f"or the shortcuts {', '.join(TARGET_SHORTCUTS)}")
    return [name for name in present if name in chosen]


def add_lora(model: GPT, r: int, alpha: float, dropout: float, targets: str | Sequence[str]) -> PeftModel:
    """Wrap `model` in a PeftModel with LoRA adapters on the `targets` projections of every block.

    The base weights are frozen, so only the adapters' A and B matrices train. PEFT
    initializes A randomly and B to zero, so the wrapped model starts with the base
    model's outputs. `model` itself is changed: its target layers become LoRA layers.

    Args:
        model: the GPT to adapt.
        r: rank of each adapter.
        alpha: lora_alpha; the update is scaled by alpha / r.
        dropout: dropout probability on the input of each adapter during training.
        targets: projection names or shortcuts, see `resolve_targets`.

    Raises:
        ValueError: r below 1, alpha not positive, dropout outside [0, 1), or invalid targets.
    """
    problems = []
    if r < 1:
        problems.append(f"the LoRA rank must be at least 1, got {r}")
    if alpha <= 0:
        problems.append(f"lora_alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        problems.append(f"the LoRA dropout must be in [0, 1), got {dropout}")
    if problems:
        raise ValueError("invalid LoRA settings: " + "; ".join(problems))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=resolve_targets(targets, model.config))
    return get_peft_model(model, config)


def merge_adapter(model: PeftModel) -> GPT:
    """Fold the adapters into the base weights (W + s B A) and return the plain GPT.

    The GPT inside `model` is changed in place and returned, so `model` is not used afterwards.
    """
    return model.merge_and_unload()


def lora_weights(model: PeftModel) -> dict[str, LoraWeights]:
    """Collect the adapter of every LoRA layer of `model`, keyed by our module name (blocks.0.attn.q_proj)."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    found = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            found[name] = LoraWeights(module.lora_A[adapter].weight.detach().float().cpu(),
                                      module.lora_B[adapter].weight.detach().float().cpu(),
                                      float(module.lora_alpha[adapter]))
    return found


# ---------------------------------------------------------------------------
# Our module names <-> transformers module names


def _transformers_adapters(weights: dict[str, LoraWeights], config: ModelConfig, layout: str | None,
                           rslora: bool) -> tuple[dict[str, LoraWeights], dict[str, dict[str, int]]]:
    """Rename our adapters to the transformers model's modules, joining q, k and v into c_attn for gpt2.

    Returns:
        (adapters keyed by transformers module name, for each c_attn adapter the rank of
        each of our projections it contains, in row order).
    """
    if layout is None:
        return dict(weights), {}
    if layout == "llama":
        renamed = {}
        for name, lora in weights.items():
            _, layer, rest = name.split(".", 2)  # "blocks", "3", "attn.q_proj"
            rest = rest.replace("attn.", "self_attn.", 1) if rest.startswith("attn.") else rest
            renamed[f"model.layers.{layer}.{rest}"] = lora
        return renamed, {}

    renamed, parts = {}, {}
    for layer in range(config.n_layer):
        ours, theirs = f"blocks.{layer}.", f"transformer.h.{layer}."
        for our_name, their_name in _GPT2_NAMES.items():
            if ours + our_name in weights:
                renamed[theirs + their_name] = weights[ours + our_name]
        qkv = {p: weights[f"{ours}attn.{p}"] for p in _QKV if f"{ours}attn.{p}" in weights}
        if qkv:
            renamed[theirs + "attn.c_attn"] = _join_qkv(qkv, config.n_embd, rslora)
            parts[theirs + "attn.c_attn"] = {p: lora.rank for p, lora in qkv.items()}
    return renamed, parts


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _join_qkv(qkv: dict[str, LoraWeights], n_embd: int, rslora: bool) -> LoraWeights:
    """Join the adapters in `qkv` into one equal adapter on c_attn (3 * n_embd output rows: q, then k, then v)."""
    first = next(iter(qkv.values()))
    rank = sum(lora.rank for lora in qkv.values())
    # The joint adapter keeps the first part's scaling s. A part with another scaling
    # has it folded into its block of B, so that each block still computes s_part B A x.
    scaling = _scaling(first.alpha, first.rank, rslora)
    alpha = first.alpha * math.sqrt(rank / first.rank) if rslora else first.alpha * rank / first.rank
    A = torch.cat([lora.A for lora in qkv.values()], dim=0)  # (rank, n_embd)
    B = torch.zeros(3 * n_embd, rank)
    column = 0
    for p, lora in qkv.items():
        row = _QKV.index(p) * n_embd
        ratio = _scaling(lora.alpha, lora.rank, rslora) / scaling
        B[row:row + n_embd, column:column + lora.rank] = lora.B * ratio if ratio != 1 else lora.B
        column += lora.rank
    return LoraWeights(A, B, alpha)


def _our_adapters(adapters: dict[str, LoraWeights], parts: dict[str, dict[str, int]], model: GPT,
                  layout: str | None, rslora: bool, source: str) -> dict[str, LoraWeights]:
    """Rename adapters of transformers modules (or of ours) to our modules, splitting c_attn.

    Raises:
        ValueError: a module that this model does not have.
    """
    ours: dict[str, LoraWeights] = {}
    for name, lora in adapters.items():
        if name.startswith("blocks."):
            ours[name] = lora
            continue
        match = None
        if layout == "llama":
            match = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", name)
            if match:
                ours[f"blocks.{match[1]}.{'attn' if match[2] == 'self_attn' else 'mlp'}.{match[3]}"] = lora
        elif layout == "gpt2":
            match = re.fullmatch(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name)
            if match and match[2] == "attn.c_attn":
                qkv = _split_qkv(lora, parts.get(name), model.config, rslora, source, name)
                ours.update({f"blocks.{match[1]}.attn.{p}": part for p, part in qkv.items()})
            elif match:
                ours[f"blocks.{match[1]}.{next(k for k, v in _GPT2_NAMES.items() if v == match[2])}"] = lora
        if match is None:
            expected = {"llama": "model.layers.N.self_attn.*_proj or model.layers.N.mlp.*_proj",
                        "gpt2": "transformer.h.N.attn.c_attn, attn.c_proj, mlp.c_fc or mlp.c_proj"}
            hint = expected.get(layout, "blocks.N.attn.*_proj or blocks.N.mlp.*_proj")
            raise ValueError(f"adapter {source} has LoRA weights for module {name!r}, which a {layout or 'gptlab'} "
                             f"model does not have (expected {hint}); the adapter belongs to another architecture")
    linears = dict(model.named_modules())
    unknown = sorted(name for name in ours if not isinstance(linears.get(name), nn.Linear))
    if unknown:
        raise ValueError(f"adapter {source} targets modules {unknown} that this model does not have (it has "
                         f"{model.config.n_layer} layers, mlp={model.config.mlp!r}); load it onto the base it was "
                         f"trained on")
    return ours


def _split_qkv(lora: LoraWeights, parts: dict[str, int] | None, config: ModelConfig, rslora: bool,
               source: str, name: str) -> dict[str, LoraWeights]:
    """Split the c_attn adapter `lora` into adapters of q_proj, k_proj and v_proj that compute the same update."""
    C = config.n_embd
    if lora.B.size(0) != 3 * C:
        raise ValueError(f"adapter {source}: {name}.lora_B.weight has {lora.B.size(0)} rows, but c_attn of this "
                         f"model has 3 * n_embd = {3 * C} outputs; the adapter belongs to another model size")
    rows = {p: lora.B[i * C:(i + 1) * C] for i, p in enumerate(_QKV)}  # (C, rank) each
    valid = isinstance(parts, dict) and set(parts) <= set(_QKV) and all(isinstance(r, int) for r in parts.values())
    if valid and parts and sum(parts.values()) == lora.rank:
        split, column = {}, 0
        block_diagonal = True
        for p in _QKV:
            rank = parts.get(p, 0)
            outside = torch.cat([rows[p][:, :column], rows[p][:, column + rank:]], dim=1)
            block_diagonal = block_diagonal and not outside.any()
            if rank:
                # Each part keeps the scaling of the joint adapter, the inverse of _join_qkv.
                share = rank / lora.rank
                alpha = lora.alpha * (math.sqrt(share) if rslora else share)
                split[p] = LoraWeights(lora.A[column:column + rank], rows[p][:, column:column + rank], alpha)
            column += rank
        if block_diagonal:
            return split
        logger.info("adapter %s: %s is not block diagonal any more (its zero blocks were trained, for example in "
                    "transformers), so it loads as one shared A on q, k and v", source, name)
    return {p: LoraWeights(lora.A, rows[p], lora.alpha) for p in _QKV}


# ---------------------------------------------------------------------------
# Saving and loading


def _pattern_key(name: str) -> str:
    """Strip the layer prefix from a module name: model.layers.3.self_attn.q_proj -> self_attn.q_proj."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def _lora_config(adapters: dict[str, LoraWeights], n_layer: int, **settings) -> LoraConfig:
    """Build a LoraConfig for exactly these adapters: target_modules, r and lora_alpha with per-module patterns.

    Modules that every layer has under one short name ("self_attn.q_proj") are named that
    way, others by their full name.
    """
    by_key: dict[str, list[str]] = {}
    for name in adapters:
        by_key.setdefault(_pattern_key(name), []).append(name)
    targets = []
    for key, names in by_key.items():
        values = {(adapters[n].rank, adapters[n].alpha) for n in names}
        if len(names) == n_layer and len(values) == 1:
            targets.append(key)
        else:
            targets += names
    r, alpha = Counter((lora.rank, lora.alpha) for lora in adapters.values()).most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for target in targets:
        lora = adapters[by_key[target][0] if target in by_key else target]
        if lora.rank != r:
            rank_pattern[target] = lora.rank
        if lora.alpha != alpha:
            alpha_pattern[target] = lora.alpha
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, bias="none", **settings)


def save_adapter(model: PeftModel, out_dir: str | os.PathLike, base_checkpoint: str | os.PathLike) -> list[Path]:
    """Write the adapters of `model` as a PEFT folder for the transformers model of its base.

    The files are written to a temporary folder beside `out_dir` and moved in one by one.

    Args:
        model: a PeftModel around our GPT, made by `add_lora` or `load_adapter`.
        out_dir: the adapter folder, created if missing.
        base_checkpoint: the gptlab checkpoint folder of the base model, recorded as
            base_model_name_or_path.

    Returns:
        The paths written: adapter_config.json and adapter_model.safetensors.
    """
    gpt = model.get_base_model()
    settings = model.peft_config[model.active_adapter]
    from gpt.hf import export_layout

    try:
        layout = export_layout(gpt.config)
    except NotImplementedError:
        layout = None  # no transformers counterpart, so the adapter keeps our module names
    adapters, parts = _transformers_adapters(lora_weights(model), gpt.config, layout, settings.use_rslora)
    config = _lora_config(adapters, gpt.config.n_layer, lora_dropout=settings.lora_dropout,
                          use_rslora=settings.use_rslora, fan_in_fan_out=layout == "gpt2",
                          base_model_name_or_path=str(base_checkpoint), inference_mode=True)
    tensors = {}
    for name, lora in adapters.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lora.A.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lora.B.contiguous()
    metadata = {"format": "pt"}
    if parts:
        metadata[_QKV_METADATA_KEY] = json.dumps(parts)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    written = []
    try:
        config.save_pretrained(str(tmp_dir))
        save_file(tensors, str(tmp_dir / ADAPTER_WEIGHTS_FILE), metadata=metadata)
        for file_name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
            os.replace(tmp_dir / file_name, out_dir / file_name)
            written.append(out_dir / file_name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return written


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, LoraWeights], dict[str, dict[str, int]]]:
    """Read and check a PEFT LoRA folder.

    Returns:
        (its LoraConfig, its adapters keyed by module name as saved, the c_attn parts record).

    Raises:
        ValueError: naming the folder, when it or a file is missing or unreadable, the
            adapter is not LoRA, has no tensors, or a module's A and B or its rank disagree.
        NotImplementedError: DoRA, trained biases or modules_to_save.
    """
    folder = Path(adapter_dir)
    source = str(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {source!r} not found; pass the folder that contains "
                         f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}, for example runs/NAME/sft/adapter")
    missing = [f for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"adapter folder {source!r} is missing {', '.join(missing)}; it is not a complete PEFT "
                         f"adapter (rerun the stage that writes it)")
    try:
        raw = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder / ADAPTER_CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else raw
        raise ValueError(f"{folder / ADAPTER_CONFIG_FILE} has peft_type {found!r}; only LoRA adapters (LORA) load")
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    try:
        config = LoraConfig.from_pretrained(source)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / ADAPTER_CONFIG_FILE} is not a valid LoRA config: {error}") from None
    unsupported = []
    if config.use_dora:
        unsupported.append("DoRA (use_dora)")
    if config.bias != "none" or getattr(config, "lora_bias", False):
        unsupported.append(f"trained biases (bias={config.bias!r})")
    if config.modules_to_save:
        unsupported.append(f"modules_to_save={config.modules_to_save}")
    if unsupported:
        raise NotImplementedError(f"adapter {source} uses {', '.join(unsupported)}, which gptlab does not load; "
                                  f"only plain LoRA adapters do")

    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as weights_file:
            metadata = weights_file.metadata() or {}
            tensors = {key: weights_file.get_tensor(key) for key in weights_file.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} cannot be read as safetensors ({error}); "
                         f"rerun the stage that writes the adapter") from None
    if not tensors:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} contains no tensors, so the adapter would change "
                         f"nothing; rerun the stage that writes it")

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} has tensor {key!r}, which is not a LoRA A or B "
                             f"matrix named {_PEFT_PREFIX}MODULE.lora_A.weight; only plain LoRA adapters load")
        halves.setdefault(match[1], {})[match[2]] = tensor.float()
    adapters = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} has lora_{next(iter(pair))} but no "
                             f"lora_{'B' if 'A' in pair else 'A'} for module {name!r}")
        A, B = pair["A"], pair["B"]
        rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.lora_alpha)
        if A.dim() != 2 or B.dim() != 2 or A.size(0) != rank or B.size(1) != rank:
            raise ValueError(f"adapter {source}: module {name!r} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}, but {ADAPTER_CONFIG_FILE} gives rank {rank}: expected ({rank}, in) "
                             f"and (out, {rank})")
        adapters[name] = LoraWeights(A, B, float(alpha))
    try:
        parts = json.loads(metadata.get(_QKV_METADATA_KEY, "{}"))
        parts = parts if isinstance(parts, dict) else {}
    except json.JSONDecodeError:
        parts = {}  # without the record, c_attn still loads exactly, as a shared A (see _split_qkv)
    return config, adapters, parts


def load_adapter(model: GPT, adapter_dir: str | os.PathLike) -> PeftModel:
    """Put the adapter saved in `adapter_dir` on `model` and return the PeftModel.

    Reads the folder `save_adapter` writes, or any PEFT LoRA adapter of the
    transformers model of the same base (see the module docstring for the mapping).
    `model` itself is changed: its target layers become LoRA layers.

    Raises:
        ValueError: naming the folder, when the folder or its files are missing or
            unreadable, it has no tensors, or its modules or shapes do not match `model`.
        NotImplementedError: the adapter uses a PEFT feature other than plain LoRA.
    """
    source = str(adapter_dir)
    settings, saved, parts = read_adapter(adapter_dir)
    from gpt.hf import export_layout

    try:
        layout = export_layout(model.config)
    except NotImplementedError:
        layout = None
    adapters = _our_adapters(saved, parts, model, layout, settings.use_rslora, source)

    modules = dict(model.named_modules())
    wrong = []
    for name, lora in adapters.items():
        linear = modules[name]
        if lora.A.size(1) != linear.in_features or lora.B.size(0) != linear.out_features:
            wrong.append(f"{name}: lora_A {tuple(lora.A.shape)} and lora_B {tuple(lora.B.shape)}, but the layer maps "
                         f"{linear.in_features} -> {linear.out_features} features")
    if wrong:
        wrong.sort()
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(f"adapter {source} does not fit this model: {'; '.join(wrong[:3])}{more}. Load it onto the "
                         f"base it was trained on")

    config = _lora_config(adapters, model.config.n_layer, lora_dropout=settings.lora_dropout,
                          use_rslora=settings.use_rslora)
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    adapter = peft_model.active_adapter
    layers = dict(peft_model.get_base_model().named_modules())
    with torch.no_grad():
        for name, lora in adapters.items():
            layer = layers[name]
            layer.lora_A[adapter].weight.copy_(lora.A)
            layer.lora_B[adapter].weight.copy_(lora.B)
    return peft_model
