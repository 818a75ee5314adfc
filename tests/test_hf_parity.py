"""Parity of our GPT with `transformers` (GPT2LMHeadModel, LlamaForCausalLM) on the same weights.

Every tensor, biases and norm weights included, is drawn at random, because the
default zeros and ones would hide a mapping bug. Logits must agree within 1e-4 (max
abs diff) with and without padding and with a KV cache, in both directions.
"""

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig

from gpt.checkpoint import load_weights
from gpt.decoding import DecodePlan
from gpt.hf import (
    export_layout,
    from_hf_config,
    from_hf_model,
    from_hf_state_dict,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)
from gpt.model import GPT, KVCache, ModelConfig

TOL = 1e-4
VOCAB = 199
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=48)

CASES = {
    "gpt2": ModelConfig.from_layout("gpt2", mlp_hidden=48, **TINY),  # feed-forward width not 4 * n_embd
    "gpt2_untied": ModelConfig.from_layout("gpt2", tie_embeddings=False, **TINY),
    "llama_gqa": ModelConfig.from_layout("llama", n_kv_head=2, rope_theta=500.0, **TINY),
    "llama_mqa_bias_tied": ModelConfig.from_layout("llama", n_kv_head=1, bias=True, tie_embeddings=True,
                                                   rope_theta=20000.0, **TINY),
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: norm weights near 1, everything else N(0, 0.2^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or "ln_" in name
            param.copy_(1.0 + 0.3 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


def hf_model_for(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(to_hf_config(config))
    randomize_(hf_model, seed)
    return hf_model.eval()


def our_model_for(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    randomize_(model, seed)
    return model.eval()


def ours_from_theirs(hf_model, config: ModelConfig) -> GPT:
    model = GPT(config)
    load_weights(model, from_hf_state_dict(hf_model.state_dict(), config), source="test")
    return model.eval()


def padded_batch(side: str, seed: int = 1):
    """(3, 12) ids and mask: row 0 unpadded, rows 1 and 2 padded with 4 and 7 zeros on `side`."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, VOCAB, (3, 12), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.long)
    for row, n_pad in ((1, 4), (2, 7)):
        pad = slice(0, n_pad) if side == "left" else slice(12 - n_pad, 12)
        mask[row, pad] = 0
        idx[row, pad] = 1  # <|pad|>
    return idx, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # transformers counts positions from the first column, so a left-padded row needs them given.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# transformers 5.25 names the cache argument `cache`; older versions name it past_key_values.
CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


@pytest.fixture(params=list(CASES), ids=list(CASES))
def config(request) -> ModelConfig:
    return CASES[request.param]


@torch.no_grad()
def test_theirs_to_ours_logits(config):
    hf_model = hf_model_for(config)
    ours = ours_from_theirs(hf_model, config)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))

    expected = hf_model(idx).logits
    logits = ours(idx).logits

    assert expected.std() > 0.5  # logits large enough for the tolerance to mean something
    assert max_diff(logits, expected) < TOL


@torch.no_grad()
def test_ours_to_theirs_logits(config):
    ours = our_model_for(config)
    hf_model = to_hf_model(ours)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))

    expected = ours(idx).logits
    logits = hf_model(idx).logits

    assert expected.std() > 0.5
    assert max_diff(logits, expected) < TOL


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_logits(config, side):
    hf_model = hf_model_for(config)
    ours = ours_from_theirs(hf_model, config)
    idx, mask = padded_batch(side)

    expected = hf_model(idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    logits = ours(idx, attention_mask=mask).logits

    real = mask.bool()
    assert max_diff(logits[real], expected[real]) < TOL


@torch.no_grad()
def test_left_padding_matches_unpadded(config):
    ours = our_model_for(config)
    idx, mask = padded_batch("left")

    padded = ours(idx, attention_mask=mask).logits[2, 7:]
    alone = ours(idx[2:, 7:]).logits[0]

    assert max_diff(padded, alone) < TOL


@torch.no_grad()
def test_kv_cache_decoding(config):
    """Prefill a left-padded batch, then feed 6 given tokens one at a time through both caches."""
    hf_model = hf_model_for(config)
    ours = ours_from_theirs(hf_model, config)
    prompt, prompt_mask = padded_batch("left")
    new_tokens = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    B, T = prompt.shape

    kv_cache = KVCache(config, batch_size=B, max_length=T + new_tokens.size(1))
    our_steps = [ours(prompt, attention_mask=prompt_mask, kv_cache=kv_cache).logits[:, -1]]
    hf_cache = DynamicCache(config=hf_model.config)
    mask, positions = prompt_mask, positions_from_mask(prompt_mask)
    hf_steps = [hf_model(prompt, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{CACHE_ARG: hf_cache}).logits[:, -1]]
    for step in range(new_tokens.size(1)):
        token = new_tokens[:, step:step + 1]
        our_steps.append(ours(token, kv_cache=kv_cache).logits[:, -1])
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        hf_steps.append(hf_model(token, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{CACHE_ARG: hf_cache}).logits[:, -1])
    full_ids = torch.cat([prompt, new_tokens], dim=1)
    uncached = ours(full_ids, attention_mask=mask).logits[:, T - 1:]

    assert isinstance(kv_cache.decode_plan, DecodePlan)  # the one-token steps took gpt.decoding's path
    assert max_diff(torch.stack(our_steps, dim=1), torch.stack(hf_steps, dim=1)) < TOL
    assert max_diff(torch.stack(our_steps, dim=1), uncached) < TOL


def test_round_trip_is_exact(config):
    ours = our_model_for(config)
    back = from_hf_model(to_hf_model(ours))

    assert back.config == config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_config_round_trip(config):
    assert from_hf_config(to_hf_config(config)) == config


def test_hf_config_fields():
    gpt2 = to_hf_config(CASES["gpt2"], bos_token_id=0, eos_token_id=0, pad_token_id=1)
    llama = to_hf_config(CASES["llama_gqa"])

    assert isinstance(gpt2, GPT2Config)
    assert gpt2.n_inner == 48
    assert gpt2.n_positions == 48
    assert gpt2.activation_function == "gelu_new"
    assert gpt2.pad_token_id == 1
    assert isinstance(llama, LlamaConfig)
    assert llama.num_key_value_heads == 2
    assert llama.rope_parameters["rope_theta"] == 500.0
    assert llama.intermediate_size == CASES["llama_gqa"].ffn_hidden
    assert llama.tie_word_embeddings is False


def test_state_dict_keys_match_transformers(config):
    ours = our_model_for(config)
    hf_model = to_hf_model(ours)

    assert set(to_hf_state_dict(ours)) == set(hf_model.state_dict())


def test_gpt2_checkpoint_without_prefix():
    """Original GPT-2 files come from GPT2Model: no "transformer." prefix, and causal-mask buffers."""
    config = CASES["gpt2"]
    hf_model = hf_model_for(config)
    state = {name.removeprefix("transformer."): t for name, t in hf_model.state_dict().items()
             if name != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 48, 48)

    converted = from_hf_state_dict(state, config)
    expected = from_hf_state_dict(hf_model.state_dict(), config)

    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[name], expected[name]) for name in expected)


def test_state_dict_mismatch_lists_names():
    config = CASES["llama_gqa"]
    state = to_hf_state_dict(our_model_for(config))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)

    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        from_hf_state_dict(state, config)


@pytest.mark.parametrize("overrides, fields", [
    (dict(pos_encoding="alibi"), "pos_encoding='rope' \\(got 'alibi'\\)"),
    (dict(mlp="swiglu", norm="rmsnorm", pos_encoding="learned", bias=False), "pos_encoding='rope' \\(got 'learned'\\)"),
    (dict(n_kv_head=2), "n_kv_head=4"),
    (dict(bias=False), "bias=True \\(got False\\)"),
])
def test_unsupported_layout_names_fields(overrides, fields):
    layout = "llama" if overrides.get("pos_encoding") == "alibi" else "gpt2"
    config = ModelConfig.from_layout(layout, **{**TINY, **overrides})

    with pytest.raises(NotImplementedError, match=fields):
        export_layout(config)


def test_layouts_detected():
    assert export_layout(CASES["gpt2_untied"]) == "gpt2"
    assert export_layout(CASES["llama_mqa_bias_tied"]) == "llama"


@pytest.mark.parametrize("hf_config, setting", [
    (LlamaConfig(hidden_size=32, num_attention_heads=4, hidden_act="gelu"), "hidden_act='gelu'"),
    (LlamaConfig(hidden_size=32, num_attention_heads=4,
                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type='linear'"),
    (LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=16), "head_dim=16"),
    (GPT2Config(n_embd=32, n_head=4, activation_function="relu"), "activation_function='relu'"),
    (GPT2Config(n_embd=32, n_head=4, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_from_hf_config_rejects(hf_config, setting):
    with pytest.raises(NotImplementedError, match=setting):
        from_hf_config(hf_config)


@pytest.mark.parametrize("change", [{"qk_norm": True}, {"sliding_window": 8}])
def test_export_rejects_variations(change):
    from gpt.hf import export_layout

    config = ModelConfig.from_layout("llama", vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=32, **change)
    with pytest.raises(NotImplementedError, match=next(iter(change))):
        export_layout(config)
