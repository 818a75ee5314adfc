"""Conversion between our GPT and Hugging Face `transformers` models, and export to a
folder that `AutoModelForCausalLM` and `AutoTokenizer` load.

Two layouts of `gpt.model.LAYOUTS` have an exact counterpart in `transformers`:

    gpt2   GPT2LMHeadModel. Its Conv1D layers store weights as (in, out), the
           transpose of nn.Linear, and one c_attn layer contains q, k and v
           concatenated along the output dimension.
    llama  LlamaForCausalLM. Same tensors and shapes as ours under other names.
           Both apply RoPE to pairs (i, i + head_dim/2) (the rotate-half
           layout), so q_proj and k_proj need no permutation.

Besides the layout, the mapping carries vocab_size, n_layer, n_head, n_embd,
block_size, the feed-forward width, norm_eps, rope_theta, tie_embeddings and
(llama) n_kv_head and bias. Any other combination of ModelConfig fields (ALiBi,
no positions, LayerNorm with SwiGLU, grouped-query attention in the gpt2
layout...) raises NotImplementedError.

Limits:
- Written for transformers 5 (tested with 5.25): the rope base goes into
  `rope_parameters`, the transformers 5 name (transformers 4 reads `rope_theta`),
  and tokenizer_config.json names TokenizersBackend, a transformers 5 class.
- Llama in transformers has dropout on attention weights only, so config.dropout
  on embeddings and residual branches does not carry over. Inference is unaffected.
- LlamaModel builds its embedding with padding_idx = pad_token_id, so fine-tuning
  the export in transformers leaves the <|pad|> row of the embedding unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from gpt.checkpoint import load_weights
from gpt.model import GPT, LAYOUTS, ModelConfig
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

logger = logging.getLogger(__name__)

ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ENDOFTEXT_ID = SPECIAL_TOKENS.index(ENDOFTEXT_TOKEN)
PAD_ID = SPECIAL_TOKENS.index(PAD_TOKEN)

# ModelConfig fields that fix the module structure of each export target. The other
# fields of LAYOUTS (norm_eps, tie_embeddings, and bias for llama) map onto
# transformers config values, so any value of them exports.
EXPORT_STRUCTURE: dict[str, dict] = {
    "gpt2": {name: LAYOUTS["gpt2"][name] for name in ("pos_encoding", "norm", "mlp", "bias")},
    "llama": {name: LAYOUTS["llama"][name] for name in ("pos_encoding", "norm", "mlp")},
}


def export_layout(config: ModelConfig, *, weights_only: bool = False) -> str:
    """Return the layout ("gpt2" or "llama") whose transformers class reproduces `config`.

    With `weights_only`, the layout whose weight names and shapes fit, even when
    qk_norm or a sliding window makes the computation differ (for mapping weights
    into transformers classes that have those options, such as Qwen3 and Mistral).

    Raises:
        NotImplementedError: no transformers class matches; the message names each
            field that differs from the nearest layout, with both values.
    """
    differences = {}
    for layout, structure in EXPORT_STRUCTURE.items():
        differences[layout] = [f"{name}={value!r} (got {getattr(config, name)!r})"
                               for name, value in structure.items() if getattr(config, name) != value]
        # GPT2Attention has one head count for queries, keys and values.
        if layout == "gpt2" and config.n_kv_head != config.n_head:
            differences[layout].append(f"n_kv_head={config.n_head} (= n_head; got {config.n_kv_head})")
        # Neither GPT2 nor Llama has these; exporting without them would change the outputs.
        if weights_only:
            continue
        if getattr(config, "qk_norm", False):
            differences[layout].append("qk_norm=False (got True)")
        if getattr(config, "sliding_window", None) is not None:
            differences[layout].append(f"sliding_window=None (got {config.sliding_window})")
    for layout, found in differences.items():
        if not found:
            return layout
    nearest = min(differences, key=lambda layout: len(differences[layout]))
    raise NotImplementedError(
        f"this model has no transformers export target. The nearest layout, {nearest!r}, needs "
        f"{', '.join(differences[nearest])}. Only the gpt2 and llama layouts export (see "
        f"ModelConfig.from_layout), and other combinations train and generate in gptlab only."
    )


def to_hf_config(config: ModelConfig, *, bos_token_id: int | None = ENDOFTEXT_ID,
                 eos_token_id: int | None = ENDOFTEXT_ID, pad_token_id: int | None = PAD_ID) -> PreTrainedConfig:
    """Build the transformers config of a model: a GPT2Config or a LlamaConfig.

    Args:
        config: our model config, which must match the gpt2 or llama layout (`export_layout`).
        bos_token_id, eos_token_id, pad_token_id: special-token ids. The defaults are
            those of gptlab tokenizers: <|endoftext|> as BOS and EOS, and <|pad|>.

    Raises:
        NotImplementedError: the config has no transformers counterpart.
    """
    layout = export_layout(config)
    token_ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if layout == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.ffn_hidden,
            activation_function="gelu_new",  # the tanh approximation, as our MLP
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            **token_ids,
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.dropout,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        **token_ids,
    )


def from_hf_config(hf_config: PreTrainedConfig) -> ModelConfig:
    """Build our ModelConfig from a GPT2Config or LlamaConfig.

    Raises:
        NotImplementedError: another model type, or settings our GPT lacks (another
            activation, scaled RoPE, a head_dim other than hidden_size / heads, ...),
            all listed in one message.
    """
    unsupported = []

    def need(name: str, expected: object) -> None:
        value = getattr(hf_config, name, None)
        if value != expected:
            unsupported.append(f"{name}={value!r} (supported: {expected!r})")

    if isinstance(hf_config, GPT2Config):
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            unsupported.append(f"activation_function={hf_config.activation_function!r} (supported: 'gelu_new')")
        need("scale_attn_weights", True)
        need("scale_attn_by_inverse_layer_idx", False)
        need("add_cross_attention", False)
        if hf_config.resid_pdrop != hf_config.embd_pdrop or hf_config.resid_pdrop != hf_config.attn_pdrop:
            logger.warning("GPT2Config has different dropouts (resid %s, embd %s, attn %s). Using resid_pdrop "
                           "for all three, because our GPT has one dropout rate.",
                           hf_config.resid_pdrop, hf_config.embd_pdrop, hf_config.attn_pdrop)
        values = dict(
            LAYOUTS["gpt2"],
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            block_size=hf_config.n_positions,
            mlp_hidden=hf_config.n_inner,
            dropout=float(hf_config.resid_pdrop),
            norm_eps=hf_config.layer_norm_epsilon,
            tie_embeddings=hf_config.tie_word_embeddings,
            init_std=hf_config.initializer_range,
        )
    elif isinstance(hf_config, LlamaConfig):
        need("hidden_act", "silu")
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            unsupported.append(f"rope_parameters.rope_type={rope.get('rope_type')!r} (supported: 'default')")
        need("head_dim", hf_config.hidden_size // hf_config.num_attention_heads)
        if hf_config.attention_bias != hf_config.mlp_bias:
            unsupported.append(f"attention_bias={hf_config.attention_bias} with mlp_bias={hf_config.mlp_bias} "
                               f"(supported: both equal, because our bias field sets both)")
        values = dict(
            LAYOUTS["llama"],
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads,
            n_embd=hf_config.hidden_size,
            block_size=hf_config.max_position_embeddings,
            mlp_hidden=hf_config.intermediate_size,
            bias=hf_config.attention_bias,
            dropout=float(hf_config.attention_dropout or 0.0),
            norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            tie_embeddings=hf_config.tie_word_embeddings,
            init_std=hf_config.initializer_range,
        )
    else:
        raise NotImplementedError(f"cannot convert a {type(hf_config).__name__} (model_type "
                                  f"{getattr(hf_config, 'model_type', None)!r}); supported: GPT2Config, LlamaConfig")
    if unsupported:
        raise NotImplementedError(f"{type(hf_config).__name__} has settings our GPT cannot reproduce: "
                                  f"{', '.join(unsupported)}")
    config = ModelConfig(**values)
    if config.mlp_hidden == ModelConfig(**{**values, "mlp_hidden": None}).ffn_hidden:
        config.mlp_hidden = None  # the layout's default width, so a round trip gives back the same config
    return config


# Our names -> transformers names for the llama layout. Block tensors are named
# relative to blocks.{i}. and model.layers.{i}.
_LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LLAMA_BLOCK_PREFIXES = {"norm_1.": "input_layernorm.", "norm_2.": "post_attention_layernorm.",
                         "attn.": "self_attn.", "mlp.": "mlp."}


def _llama_name(name: str) -> str:
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    _, layer, rest = name.split(".", 2)  # "blocks", "3", "attn.q_proj.weight"
    for ours, theirs in _LLAMA_BLOCK_PREFIXES.items():
        if rest.startswith(ours):
            return f"model.layers.{layer}.{theirs}{rest[len(ours):]}"
    raise AssertionError(f"no transformers name for {name}")


def _our_names(config: ModelConfig) -> list[str]:
    """List the tensor names of a GPT with `config`, without the tied output weight (as checkpoints store them)."""
    with torch.device("meta"):
        names = list(GPT(config).state_dict())
    if config.tie_embeddings:
        names.remove("lm_head.weight")
    return names


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Convert our weights to the state dict of the matching transformers model.

    Returns:
        Tensors under the keys of `to_hf_model(model).state_dict()`, lm_head.weight included
        when tied (transformers lists both names of a tied tensor).

    Raises:
        NotImplementedError: the model matches neither export layout.
    """
    layout = export_layout(model.config, weights_only=True)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if layout == "llama":
        return {_llama_name(name): tensor for name, tensor in state.items()}

    out = {
        "transformer.wte.weight": state["wte.weight"],
        "transformer.wpe.weight": state["wpe.weight"],
        "transformer.ln_f.weight": state["norm_f.weight"],
        "transformer.ln_f.bias": state["norm_f.bias"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(model.config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"]
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
        # Conv1D computes x @ W + b with W of shape (in, out): the transpose of nn.Linear.
        qkv = [f"{ours}attn.{p}_proj" for p in "qkv"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([state[f"{p}.weight"] for p in qkv], dim=0).t().contiguous()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([state[f"{p}.bias"] for p in qkv], dim=0)
        for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"].t().contiguous()
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert a transformers state dict to our tensor names and shapes.

    Args:
        state: the state dict of a GPT2LMHeadModel or LlamaForCausalLM. GPT-2 keys may
            lack the "transformer." prefix, as in checkpoints saved from GPT2Model, and
            the causal-mask buffers (attn.bias, attn.masked_bias) of old GPT-2 files are
            skipped. When the embeddings are tied, lm_head.weight may be present or not.
        config: our config of the model (it decides the layout and the tensors expected).

    Returns:
        Our state dict without the tied output weight, as `gpt.checkpoint.load_weights` takes it.

    Raises:
        NotImplementedError: `config` matches neither export layout.
        ValueError: tensors are missing or unexpected, as listed in the message.
    """
    layout = export_layout(config, weights_only=True)
    state = dict(state)
    if layout == "gpt2":
        state = {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": tensor
                 for name, tensor in state.items()
                 if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)

    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        used.add(name)
        return state.get(name)

    out: dict[str, torch.Tensor | None] = {}
    if layout == "llama":
        for name in _our_names(config):
            out[name] = take(_llama_name(name))
    else:
        out["wte.weight"] = take("transformer.wte.weight")
        out["wpe.weight"] = take("transformer.wpe.weight")
        out["norm_f.weight"] = take("transformer.ln_f.weight")
        out["norm_f.bias"] = take("transformer.ln_f.bias")
        if not config.tie_embeddings:
            out["lm_head.weight"] = take("lm_head.weight")
        C = config.n_embd
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[f"{ours}{a}.weight"] = take(f"{theirs}{b}.weight")
                out[f"{ours}{a}.bias"] = take(f"{theirs}{b}.bias")
            c_attn_weight, c_attn_bias = take(f"{theirs}attn.c_attn.weight"), take(f"{theirs}attn.c_attn.bias")
            for j, p in enumerate("qkv"):
                # c_attn.weight is (C, 3C): columns [jC, (j+1)C) are the q, k or v projection.
                out[f"{ours}attn.{p}_proj.weight"] = None if c_attn_weight is None else c_attn_weight[:, j * C:(j + 1) * C].t().contiguous()
                out[f"{ours}attn.{p}_proj.bias"] = None if c_attn_bias is None else c_attn_bias[j * C:(j + 1) * C]
            for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
                weight = take(f"{theirs}{b}.weight")
                out[f"{ours}{a}.weight"] = None if weight is None else weight.t().contiguous()
                out[f"{ours}{a}.bias"] = take(f"{theirs}{b}.bias")

    missing = sorted(name for name in used if name not in state)
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise ValueError(f"transformers state dict does not match a {layout} model with this config: "
                         f"missing {missing}, unexpected {unexpected}")
    return out


def to_hf_model(model: GPT, *, bos_token_id: int | None = ENDOFTEXT_ID, eos_token_id: int | None = ENDOFTEXT_ID,
                pad_token_id: int | None = PAD_ID) -> PreTrainedModel:
    """Build a GPT2LMHeadModel or LlamaForCausalLM holding a copy of our weights.

    The new model has our model's device, dtype and train/eval mode, and a generation
    config with the given special-token ids (see `to_hf_config`).

    Raises:
        NotImplementedError: the model matches neither export layout.
    """
    hf_config = to_hf_config(model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id)
    model_class = GPT2LMHeadModel if isinstance(hf_config, GPT2Config) else LlamaForCausalLM
    reference = model.wte.weight
    hf_model = model_class(hf_config).to(device=reference.device, dtype=reference.dtype)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    hf_model.generation_config = GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                                  pad_token_id=pad_token_id)
    return hf_model.train(model.training)


def from_hf_model(hf_model: PreTrainedModel) -> GPT:
    """Build our GPT from a GPT2LMHeadModel or LlamaForCausalLM, with a copy of its weights
    on its device, in its dtype and its train/eval mode.

    Raises:
        NotImplementedError: the model type or one of its settings has no equivalent here.
        ValueError: its state dict does not match its config.
    """
    config = from_hf_config(hf_model.config)
    reference = hf_model.get_input_embeddings().weight
    with torch.device(reference.device):
        model = GPT(config).to(reference.dtype)
    state = from_hf_state_dict(hf_model.state_dict(), config)
    load_weights(model, state, source=f"the state dict of a {type(hf_model).__name__}")
    return model.train(hf_model.training)


def load_hf_tokenizer(tokenizer_file: str | os.PathLike, *, model_max_length: int,
                      chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Wrap our tokenizer.json as a transformers fast tokenizer with our special tokens.

    <|endoftext|> is BOS, EOS and UNK (byte-level BPE never needs UNK, but pipelines
    expect one), <|pad|> is PAD, and the chat-role tokens are extra special tokens,
    so `decode(skip_special_tokens=True)` drops them all.

    NOTE: unlike `gpt.tokenizer.Tokenizer.encode`, a transformers tokenizer parses
    special-token text in its input: "<|user|>" becomes id 3, not ordinary text.
    Chat templates rely on that. Pass `split_special_tokens=True` when encoding user
    text to get our ids.

    Raises:
        ValueError: the file is not a gptlab tokenizer.json (see `Tokenizer.from_file`).
    """
    Tokenizer.from_file(tokenizer_file)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=ENDOFTEXT_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        unk_token=ENDOFTEXT_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (ENDOFTEXT_TOKEN, PAD_TOKEN)],
        model_max_length=model_max_length,
        chat_template=chat_template,
    )


def save_hf_folder(model: GPT, tokenizer_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                   chat_template: str | None = None) -> list[Path]:
    """Write a transformers folder: config.json, model.safetensors, generation_config.json
    and the tokenizer files.

    The files are written to a temporary folder beside `out_dir` and then moved in one by
    one, so a killed export leaves each file of `out_dir` either old or new. Files of an
    earlier export that this one does not write stay in place.

    Args:
        model: a GPT in the gpt2 or llama layout.
        tokenizer_file: our tokenizer.json; its vocabulary must fit in model.config.vocab_size.
        out_dir: the folder to write; created if missing.
        chat_template: a Jinja chat template for `tokenizer.apply_chat_template`, or None
            for none. transformers 5 saves it as chat_template.jinja.

    Returns:
        The paths written, sorted.

    Raises:
        NotImplementedError: the model matches neither export layout.
        ValueError: the tokenizer file is invalid or has more ids than the model.
    """
    export_layout(model.config)
    tokenizer = load_hf_tokenizer(tokenizer_file, model_max_length=model.config.block_size,
                                  chat_template=chat_template)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_file} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}. Export the tokenizer the model was trained with.")
    hf_model = to_hf_model(model, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id).eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        # transformers 5 writes safetensors only (save_pretrained has no safe_serialization switch).
        hf_model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        written = []
        for path in sorted(tmp_dir.iterdir()):
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return written
