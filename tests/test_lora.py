"""Tests of gpt/lora.py and the merge stage: LoRA through peft on tiny float32 GPTs.

The adapters get random B matrices (peft starts B at zero, which would make every
comparison trivially pass). The reference for saved adapters is peft itself,
loading them onto the transformers model that gpt.hf exports.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt.checkpoint import TOKENIZER_FILE, load_model, save_model
from gpt.hf import to_hf_model
from gpt.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    add_lora,
    load_adapter,
    lora_weights,
    merge_adapter,
    resolve_targets,
    save_adapter,
)
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_config(layout: str, **overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=32)
    if layout == "llama":
        values["n_kv_head"] = 2  # k_proj and v_proj map 32 -> 16 features: non-square
    if layout == "alibi":
        return ModelConfig(**{**values, "pos_encoding": "alibi", **overrides})
    return ModelConfig.from_layout(layout, **{**values, **overrides})


def base_model(layout: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(layout, **overrides)).eval()


def adapted(base: GPT, targets: str, r: int = 4, alpha: float = 8.0, seed: int = 1) -> peft.PeftModel:
    """A LoRA copy of `base` whose B matrices are random, so that the adapters change the output."""
    model = add_lora(copy.deepcopy(base), r=r, alpha=alpha, dropout=0.0, targets=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def token_batch(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx).logits


def test_resolve_targets_shortcuts():
    gelu, swiglu = tiny_config("gpt2"), tiny_config("llama")
    assert resolve_targets("all", gelu) == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    assert resolve_targets("mlp", swiglu) == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_targets("v_proj, q_proj,attention", swiglu) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_resolve_targets_errors():
    with pytest.raises(ValueError, match="gate_proj does not exist.*mlp='gelu'"):
        resolve_targets("gate_proj", tiny_config("gpt2"))
    with pytest.raises(ValueError, match="unknown LoRA target 'c_attn'"):
        resolve_targets("q_proj,c_attn", tiny_config("gpt2"))
    with pytest.raises(ValueError, match="empty"):
        resolve_targets(" , ", tiny_config("gpt2"))


def test_only_lora_trainable():
    model = add_lora(base_model("llama"), r=4, alpha=8, dropout=0.1, targets="all")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert trainable == lora
    # Per block: q (32->32), k and v (32->16), o (32->32), gate and up (32->128), down (128->32).
    dims = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 128), (32, 128), (128, 32)]
    expected = 2 * sum(4 * (fan_in + fan_out) for fan_in, fan_out in dims)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_add_lora_rejects_bad_settings():
    with pytest.raises(ValueError, match="rank must be at least 1, got 0"):
        add_lora(base_model("gpt2"), r=0, alpha=8, dropout=0.0, targets="all")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        add_lora(base_model("gpt2"), r=4, alpha=8, dropout=1.5, targets="all")


@pytest.mark.parametrize("layout,targets", [("gpt2", "all"), ("llama", "all"), ("llama", "k_proj,down_proj")])
def test_merged_matches_unmerged(layout, targets):
    model = adapted(base_model(layout), targets)
    idx = token_batch()
    before = logits_of(model, idx)
    assert not torch.allclose(before, logits_of(base_model(layout), idx), atol=1e-3)
    merged = merge_adapter(model)
    assert type(merged) is GPT
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, idx), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout,targets", [("gpt2", "q_proj,v_proj"), ("gpt2", "all"), ("gpt2", "k_proj"),
                                            ("llama", "all")])
def test_transformers_loads_adapter(tmp_path, layout, targets):
    base = base_model(layout)
    model = adapted(base, targets)
    save_adapter(model, tmp_path, base_checkpoint="runs/x/pretrain")
    hf_model = peft.PeftModel.from_pretrained(to_hf_model(base).eval(), str(tmp_path))
    idx = token_batch()
    torch.testing.assert_close(hf_model(idx).logits, logits_of(model, idx), atol=1e-5, rtol=0)


def test_adapter_config_names_transformers_modules(tmp_path):
    save_adapter(adapted(base_model("gpt2"), "q_proj,v_proj,down_proj", r=4, alpha=8), tmp_path, "runs/x/pretrain")
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert sorted(config["target_modules"]) == ["attn.c_attn", "mlp.c_proj"]
    assert config["fan_in_fan_out"] is True
    assert config["r"] == 4
    assert config["lora_alpha"] == 8
    # Two projections in c_attn: rank 8, and alpha 16 keeps alpha / r = 2.
    assert config["rank_pattern"] == {"attn.c_attn": 8}
    assert config["alpha_pattern"] == {"attn.c_attn": 16}
    assert config["base_model_name_or_path"] == "runs/x/pretrain"
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
        B = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
    assert B.shape == (96, 8)
    assert not B[32:64].any()  # k is not targeted: zero rows
    assert not B[:32, 4:].any()  # q rows use only q's columns
    assert not B[64:, :4].any()  # v rows use only v's columns


@pytest.mark.parametrize("layout,targets", [("gpt2", "q_proj,v_proj"), ("gpt2", "all"), ("llama", "all"),
                                            ("alibi", "v_proj,up_proj")])
def test_load_adapter_round_trip(tmp_path, layout, targets):
    base = base_model(layout)
    model = adapted(base, targets)
    save_adapter(model, tmp_path, "base")
    loaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    saved_weights, loaded_weights = lora_weights(model), lora_weights(loaded)
    assert sorted(loaded_weights) == sorted(saved_weights)
    for name, lora in saved_weights.items():
        assert torch.equal(loaded_weights[name].A, lora.A), name
        assert torch.equal(loaded_weights[name].B, lora.B), name
        assert loaded_weights[name].alpha == lora.alpha, name
    idx = token_batch()
    torch.testing.assert_close(logits_of(loaded, idx), logits_of(model, idx), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout,hf_targets", [("gpt2", ["attn.c_attn", "mlp.c_fc"]),
                                               ("llama", ["q_proj", "v_proj", "gate_proj"])])
def test_load_adapter_trained_in_transformers(tmp_path, layout, hf_targets):
    base = base_model(layout)
    hf_model = to_hf_model(base).eval()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=hf_targets, fan_in_fan_out=layout == "gpt2")
    hf_peft = peft.get_peft_model(hf_model, config)
    with torch.no_grad():
        for name, param in hf_peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)  # a full B: c_attn is not block diagonal
    hf_peft.save_pretrained(str(tmp_path))
    loaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    idx = token_batch()
    torch.testing.assert_close(logits_of(loaded, idx), hf_peft.eval()(idx).logits, atol=1e-5, rtol=0)


def test_missing_folder_is_error(tmp_path):
    with pytest.raises(ValueError, match="adapter folder .*nowhere.* not found"):
        load_adapter(base_model("gpt2"), tmp_path / "nowhere")


def test_missing_weights_file_is_error(tmp_path):
    save_adapter(adapted(base_model("gpt2"), "q_proj"), tmp_path, "base")
    (tmp_path / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=f"is missing {ADAPTER_WEIGHTS_FILE}"):
        load_adapter(base_model("gpt2"), tmp_path)


def test_empty_safetensors_is_error(tmp_path):
    save_adapter(adapted(base_model("gpt2"), "q_proj"), tmp_path, "base")
    save_file({}, str(tmp_path / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(ValueError, match="contains no tensors"):
        load_adapter(base_model("gpt2"), tmp_path)


def test_corrupt_safetensors_is_error(tmp_path):
    save_adapter(adapted(base_model("gpt2"), "q_proj"), tmp_path, "base")
    (tmp_path / ADAPTER_WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_adapter(base_model("gpt2"), tmp_path)


def test_wrong_shapes_are_error(tmp_path):
    save_adapter(adapted(base_model("llama", n_embd=48), "all"), tmp_path, "base")
    with pytest.raises(ValueError, match=r"does not fit this model: blocks\.0\.attn\.k_proj: lora_A \(4, 48\) and lora_B \(24, 4\), "
                                         r"but the layer maps 32 -> 16 features;.*and 11 more"):
        load_adapter(base_model("llama"), tmp_path)


def test_wrong_c_attn_shape_is_error(tmp_path):
    save_adapter(adapted(base_model("gpt2", n_embd=48), "q_proj"), tmp_path, "base")
    with pytest.raises(ValueError, match="c_attn of this model has 3 \\* n_embd = 96 outputs"):
        load_adapter(base_model("gpt2"), tmp_path)


def test_other_architecture_is_error(tmp_path):
    save_adapter(adapted(base_model("llama"), "q_proj"), tmp_path, "base")
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj', which a gpt2 model does not have"):
        load_adapter(base_model("gpt2"), tmp_path)


def test_missing_layer_is_error(tmp_path):
    save_adapter(adapted(base_model("llama", n_layer=3), "q_proj"), tmp_path, "base")
    with pytest.raises(ValueError, match=r"targets modules \['blocks\.2\.attn\.q_proj'\]"):
        load_adapter(base_model("llama"), tmp_path)


def test_rank_disagreeing_with_config_is_error(tmp_path):
    save_adapter(adapted(base_model("llama"), "q_proj"), tmp_path, "base")
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    config["r"] = 8
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gives rank 8"):
        load_adapter(base_model("llama"), tmp_path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    text = (REPO / "gpt" / "model.py").read_text(encoding="utf-8")[:20_000]
    path = tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE
    Tokenizer.train([text[i:i + 1000] for i in range(0, len(text), 1000)], vocab_size=VOCAB - 20).save(path)
    return path


def test_merge_stage(tmp_path, tokenizer_file):
    base = base_model("gpt2")
    save_model(base, tmp_path / "pretrain", tokenizer_file=tokenizer_file)
    model = adapted(base, "q_proj,v_proj,up_proj")
    save_adapter(model, tmp_path / "sft" / "adapter", tmp_path / "pretrain")
    code = main(["merge", "--checkpoint", str(tmp_path / "pretrain"), "--adapter", str(tmp_path / "sft" / "adapter")])
    assert code == 0
    out = tmp_path / "sft" / "merged"
    assert (out / TOKENIZER_FILE).is_file()
    assert (out / "config.yaml").is_file()
    idx = token_batch()
    torch.testing.assert_close(logits_of(load_model(out), idx), logits_of(model, idx), atol=1e-5, rtol=0)


def test_merge_stage_bad_adapter(tmp_path, tokenizer_file, capsys):
    save_model(base_model("gpt2"), tmp_path / "pretrain", tokenizer_file=tokenizer_file)
    code = main(["merge", "--checkpoint", str(tmp_path / "pretrain"), "--adapter", str(tmp_path / "missing"),
                 "--out-dir", str(tmp_path / "merged")])
    assert code == 2
    assert "adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
