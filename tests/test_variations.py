"""Architecture and optimizer variations of the core, each against a reference where one exists.

- grouped-query and multi-query attention train;
- QK-norm matches transformers' Qwen3ForCausalLM (a Llama layout with per-head q_norm
  and k_norm) on the same weights, with padding and a KV cache;
- sliding-window attention matches transformers' MistralForCausalLM, and cached
  generation equals recomputation from scratch;
- Lion and Muon train, Lion's step matches hand-worked numbers, and Muon resumes exactly;
- a bfloat16 KV cache gives nearly the logits of a float32 one.
"""

import pytest
import torch
from test_hf_parity import CACHE_ARG, max_diff, padded_batch, positions_from_mask, randomize_
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from gpt.generate import SamplingParams, _Batch, generate
from gpt.hf import to_hf_state_dict
from gpt.model import GPT, KVCache, ModelConfig
from gpt.optim import Lion, MuonWithAdamW
from gpt.training import Hooks, TrainConfig, Trainer, build_optimizer

TOL = 1e-4
VOCAB = 199
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=48)


def llama(**overrides) -> ModelConfig:
    return ModelConfig.from_layout("llama", **{**TINY, "n_kv_head": 2, **overrides})


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    randomize_(model, seed)
    return model.eval()


def reference_model(config: ModelConfig, ours: GPT):
    """The transformers model with the same architecture, holding `ours`' weights:
    Qwen3 for qk_norm, Mistral for sliding_window."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.ffn_hidden,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                  tie_word_embeddings=config.tie_embeddings)
    if config.qk_norm:
        hf_model = Qwen3ForCausalLM(Qwen3Config(attention_bias=config.bias, **common))
    else:
        hf_model = MistralForCausalLM(MistralConfig(sliding_window=config.sliding_window, **common))
    hf_model.load_state_dict(to_hf_state_dict(ours), strict=True)
    return hf_model.eval()


# ---------------------------------------------------------------------------
# Training a few steps


class RepeatBatch:
    """One fixed batch, forever: the model should overfit it."""

    def __init__(self, vocab_size: int, block_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (4, block_size + 1), generator=generator)
        self.batch = (tokens[:, :-1], tokens[:, 1:])

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def summed_loss(model, batch):
    x, y = batch
    return model(x, y, loss_reduction="sum").loss, y.numel(), {}


def make_trainer(config: ModelConfig, out_dir, optimizer: str = "adamw", lr: float = 3e-3) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=4, max_steps=100, lr=lr, warmup_steps=0, schedule="constant", device="cpu",
                      dtype="float32", optimizer=optimizer)
    batches = RepeatBatch(config.vocab_size, 16)
    return Trainer(GPT(config), cfg, out_dir, batches, Hooks(loss_fn=summed_loss))


def train_losses(trainer: Trainer, steps: int) -> list[float]:
    batch_iter = iter(trainer.batches)
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step(batch_iter)["loss"])
        trainer.step += 1
    return losses


@pytest.mark.parametrize("overrides", [
    dict(n_kv_head=1),  # multi-query
    dict(n_kv_head=2),  # grouped-query
    dict(qk_norm=True),
    dict(sliding_window=4),
], ids=["mqa", "gqa", "qk_norm", "sliding_window"])
def test_variation_trains(overrides, tmp_path):
    trainer = make_trainer(llama(**overrides), tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    losses = train_losses(trainer, 8)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5
    unchanged = [name for name, p in trainer.model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


# ---------------------------------------------------------------------------
# QK-norm against Qwen3


def test_qk_norm_adds_per_head_gains():
    model = GPT(llama(qk_norm=True))
    names = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert names["blocks.0.attn.q_norm.weight"] == (8,)
    assert names["blocks.0.attn.k_norm.weight"] == (8,)


def test_qk_norm_off_has_no_gains():
    names = [name for name, _ in GPT(llama()).named_parameters()]
    assert not any("q_norm" in name or "k_norm" in name for name in names)


@torch.no_grad()
def test_qk_norm_matches_qwen3():
    config = llama(qk_norm=True)
    ours = random_model(config)
    hf_model = reference_model(config, ours)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    without_norm = GPT(llama())
    without_norm.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith(("q_norm.weight", "k_norm.weight"))})

    expected = hf_model(idx).logits
    logits = ours(idx).logits

    assert expected.std() > 0.5
    assert max_diff(logits, expected) < TOL
    assert max_diff(without_norm.eval()(idx).logits, expected) > 0.1  # the norms matter here


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_qk_norm_padded_matches_qwen3(side):
    config = llama(qk_norm=True)
    ours = random_model(config)
    hf_model = reference_model(config, ours)
    idx, mask = padded_batch(side)

    expected = hf_model(idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    logits = ours(idx, attention_mask=mask).logits

    assert max_diff(logits[mask.bool()], expected[mask.bool()]) < TOL


# ---------------------------------------------------------------------------
# Sliding window against Mistral, by hand, and with the KV cache


def test_sliding_window_config_rejected():
    assert any("sliding_window" in p for p in llama(sliding_window=0).problems())


@torch.no_grad()
def test_sliding_window_matches_mistral():
    config = llama(sliding_window=5)
    ours = random_model(config)
    hf_model = reference_model(config, ours)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    full_attention = GPT(llama())
    full_attention.load_state_dict(ours.state_dict())

    expected = hf_model(idx).logits
    logits = ours(idx).logits

    assert expected.std() > 0.5
    assert max_diff(logits, expected) < TOL
    assert max_diff(full_attention.eval()(idx).logits, expected) > 0.1  # the window matters here


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_sliding_window_padded_matches_mistral(side):
    config = llama(sliding_window=3)
    ours = random_model(config)
    hf_model = reference_model(config, ours)
    idx, mask = padded_batch(side)

    expected = hf_model(idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    logits = ours(idx, attention_mask=mask).logits

    assert max_diff(logits[mask.bool()], expected[mask.bool()]) < TOL


@torch.no_grad()
def test_sliding_window_cache_matches_mistral():
    """Prefill a left-padded batch, then feed 6 tokens one at a time through both caches:
    the window slides over the cache as it grows."""
    config = llama(sliding_window=4)
    ours = random_model(config)
    hf_model = reference_model(config, ours)
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
    uncached = ours(torch.cat([prompt, new_tokens], dim=1), attention_mask=mask).logits[:, T - 1:]

    assert max_diff(torch.stack(our_steps, dim=1), torch.stack(hf_steps, dim=1)) < TOL
    assert max_diff(torch.stack(our_steps, dim=1), uncached) < TOL


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi", "none"])
@torch.no_grad()
def test_sliding_window_reach_by_hand(pos_encoding):
    """With one layer, the logits at position t depend on tokens t-W+1..t and on nothing before."""
    W, t = 4, 10
    model = random_model(ModelConfig.from_layout("gpt2", **{**TINY, "n_layer": 1, "pos_encoding": pos_encoding,
                                                            "sliding_window": W}))
    idx = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    base = model(idx).logits[0, t]

    outside, inside = idx.clone(), idx.clone()
    outside[0, t - W] = (idx[0, t - W] + 1) % VOCAB
    inside[0, t - W + 1] = (idx[0, t - W + 1] + 1) % VOCAB

    assert torch.equal(model(outside).logits[0, t], base)
    assert max_diff(model(inside).logits[0, t], base) > 1e-3


@torch.no_grad()
def test_window_as_long_as_context_changes_nothing():
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(6))
    windowed = random_model(llama(sliding_window=48))
    plain = random_model(llama())

    assert torch.equal(windowed(idx).logits, plain(idx).logits)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_sliding_window_generation_matches_no_cache(layout):
    config = ModelConfig.from_layout(layout, **{**TINY, "sliding_window": 5})
    model = random_model(config)
    prompts = [[5, 9, 2, 33, 17, 8, 41, 3, 60, 12, 7, 7, 1], [30, 4, 22], [11]]
    params = SamplingParams(max_new_tokens=15, temperature=0.0)

    batched = generate(model, prompts, params)

    for prompt, completion in zip(prompts, batched):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(15):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert completion.tokens == ids[len(prompt):]


@torch.no_grad()
def test_packed_mask_gets_window():
    """A caller's 4-D mask (packed rows) still gets the window on top."""
    config = llama(sliding_window=3)
    model = random_model(config)
    idx = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]

    assert max_diff(model(idx, attention_mask=causal).logits, model(idx).logits) < TOL


# ---------------------------------------------------------------------------
# Optimizers


@pytest.mark.parametrize("optimizer, lr", [("adamw", 3e-3), ("lion", 1e-3), ("muon", 3e-3)])
def test_optimizer_trains(optimizer, lr, tmp_path):
    trainer = make_trainer(llama(), tmp_path, optimizer=optimizer, lr=lr)
    losses = train_losses(trainer, 8)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3


def test_lion_step_by_hand():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Lion([weight], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    weight.grad = torch.tensor([0.3, 0.2, -0.4])
    optimizer.step()
    # Momentum 0: update = sign(0.1 * g) = [1, 1, -1]; p = p * (1 - 0.1 * 0.5) - 0.1 * update.
    assert torch.allclose(weight.detach(), torch.tensor([0.85, -2.0, 0.575]))
    # New momentum: 0.01 * g.
    assert torch.allclose(optimizer.state[weight]["exp_avg"], torch.tensor([0.003, 0.002, -0.004]))

    weight.grad = torch.tensor([-0.01, 0.2, 0.01])
    optimizer.step()
    # update = sign(0.9 * m + 0.1 * g) = sign([0.0017, 0.0218, -0.0026]) = [1, 1, -1].
    assert torch.allclose(weight.detach(), torch.tensor([0.85 * 0.95 - 0.1, -2.0 * 0.95 - 0.1, 0.575 * 0.95 + 0.1]))


def test_muon_parameter_split():
    model = GPT(llama())
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    adamw_names = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}

    assert isinstance(optimizer, MuonWithAdamW)
    assert isinstance(optimizer.muon, torch.optim.Muon)
    assert "blocks.0.attn.q_proj.weight" in muon_names
    assert "blocks.1.mlp.down_proj.weight" in muon_names
    assert adamw_names == {"wte.weight", "lm_head.weight", "norm_f.weight", "blocks.0.norm_1.weight",
                           "blocks.0.norm_2.weight", "blocks.1.norm_1.weight", "blocks.1.norm_2.weight"}
    assert muon_names | adamw_names == set(names.values())


def test_muon_groups_share_lr():
    optimizer = build_optimizer(GPT(llama()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 0.125
    assert [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups] == [0.125] * 3


def test_muon_resume_is_exact(tmp_path):
    """Save the resume state after 3 steps, load it into a fresh trainer: steps 4-6 repeat exactly."""
    straight = make_trainer(llama(), tmp_path / "a", optimizer="muon")
    expected = train_losses(straight, 6)[3:]

    first = make_trainer(llama(), tmp_path / "b", optimizer="muon")
    train_losses(first, 3)
    state = first.train_state()
    second = make_trainer(llama(), tmp_path / "c", optimizer="muon")
    second.load_train_state(state)

    assert train_losses(second, 3) == expected


def test_lion_resume_is_exact(tmp_path):
    straight = make_trainer(llama(), tmp_path / "a", optimizer="lion", lr=3e-4)
    expected = train_losses(straight, 4)[2:]

    first = make_trainer(llama(), tmp_path / "b", optimizer="lion", lr=3e-4)
    train_losses(first, 2)
    second = make_trainer(llama(), tmp_path / "c", optimizer="lion", lr=3e-4)
    second.load_train_state(first.train_state())

    assert train_losses(second, 2) == expected


# ---------------------------------------------------------------------------
# KV-cache precision


@torch.no_grad()
def test_bfloat16_cache_logits_close():
    config = llama()
    model = random_model(config)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(8))
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(config, batch_size=2, max_length=20, dtype=dtype)
        logits = [model(idx[:, :10], kv_cache=cache).logits[:, -1]]
        logits += [model(idx[:, t:t + 1], kv_cache=cache).logits[:, -1] for t in range(10, 20)]
        steps[dtype] = torch.stack(logits, dim=1)
    scale = steps[torch.float32].abs().max().item()

    assert steps[torch.bfloat16].dtype == torch.float32
    assert max_diff(steps[torch.bfloat16], steps[torch.float32]) < 0.02 * scale
    assert max_diff(steps[torch.bfloat16], steps[torch.float32]) > 0  # the cache really was rounded


def test_generate_uses_cache_dtype():
    model = random_model(llama())
    batch = _Batch(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4), pad_id=0, device=torch.device("cpu"),
                   dtype=None, vocab_limit=VOCAB, kv_cache_dtype=torch.bfloat16)
    assert batch.cache.keys.dtype == torch.bfloat16


def test_bfloat16_cache_same_greedy_tokens():
    model = random_model(llama())
    prompts = [[5, 9, 2, 33, 17, 8], [30, 4, 22]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)

    exact = generate(model, prompts, params)
    rounded = generate(model, prompts, params, kv_cache_dtype=torch.bfloat16)

    assert [c.tokens for c in rounded] == [c.tokens for c in exact]
