"""Tests of PPO and GRPO (rlhf/ppo.py, rlhf/rollout.py, rlhf/advantages.py): the advantage
and loss functions against hand-worked numbers, the rollout's log-probabilities against the
sampler's distribution, and short PPO and GRPO runs on tiny float32 GPTs whose tokenizer is
trained on TinyStories from GPTLAB_DATA_DIR."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt.generate
from gpt.chat import render_chat, render_prompt
from gpt.checkpoint import load_model, load_train_state, save_model
from gpt.config import ConfigError, build_config
from gpt.generate import Completion
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from rlhf.advantages import KLController, clipped_surrogate, clipped_value_loss, gae, group_advantages, k3_kl
from rlhf.ppo import VALUE_HEAD_FILE, PPOConfig, check_world_size, train
from rlhf.rollout import (
    DataPrompts,
    PolicyWithValueHead,
    Prompt,
    collect_rollout,
    reply_forward,
    reward_model_scorer,
    update,
)
from rlhf.reward import RewardModel, save_reward_model
from gpt.tasks import ArithmeticConfig, ArithmeticTask

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    if not data_dir:
        pytest.skip("GPTLAB_DATA_DIR is not set; point it at the data kit to train the test tokenizer on real text")
    path = Path(data_dir) / "pretrain" / "tinystories" / "tinystories_train_prefix.txt.gz"
    text = gzip.open(path, "rt", encoding="utf-8").read()
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    Tokenizer.train(text.split("\n\n")[:600], vocab_size=512).save(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_file)


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_layout("gpt2", vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer_file, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("policy")
    save_model(tiny_gpt(tokenizer.vocab_size), out, tokenizer_file=tokenizer_file, step=0)
    return out


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer_file, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("reward")
    save_reward_model(RewardModel(tiny_gpt(tokenizer.vocab_size, seed=7), tokenizer), out, tokenizer_file=tokenizer_file)
    return out


def task_prompts(tokenizer: Tokenizer, n: int) -> list[Prompt]:
    task = ArithmeticTask(ArithmeticConfig())
    return [Prompt(render_prompt(tokenizer, task.messages(p)), p) for p in task.sample(n, random.Random(0), "rl")]


def length_scorer(prompts, completions) -> torch.Tensor:
    """Scores that differ between replies, so that advantages are not all zero."""
    return torch.tensor([len(c.tokens) / 8 for c in completions], dtype=torch.float32)


def small_config(**overrides) -> PPOConfig:
    values = dict(policy="unused", task="arithmetic", max_new_tokens=8, temperature=TEMPERATURE)
    values.update(overrides)
    return PPOConfig(**values)


# ---------------------------------------------------------------------------
# Pure functions against hand-worked numbers


def test_gae_stops_at_reply_end():
    # gamma = 1, lam = 0.5. Row 0 is a reply of 3 tokens, then a padding column whose reward 9
    # and value 7 must never leak in. Row 1 is a reply of one token.
    # Row 0, from the end (the state after the last token is terminal, V = 0):
    #   t=2: delta = 1 + 0 - 0.5 = 0.5                  A2 = 0.5
    #   t=1: delta = 0 + 0.5 - 0.5 = 0                  A1 = 0 + 0.5 * 0.5 = 0.25
    #   t=0: delta = 0 + 0.5 - 0.5 = 0                  A0 = 0 + 0.5 * 0.25 = 0.125
    #   returns = A + V = 0.625, 0.75, 1.0, and 0 on padding.
    # Row 1: t=0: delta = 2 + 0 - 1 = 1, A0 = 1, return 2.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0], [2.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0], [1.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.125, 0.25, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.625, 0.75, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))


def test_gae_discount():
    # gamma = 0.5, lam = 1, the same row 0 as above:
    #   t=2: delta = 1 - 0.5 = 0.5                      A2 = 0.5
    #   t=1: delta = 0 + 0.5 * 0.5 - 0.5 = -0.25        A1 = -0.25 + 0.5 * 0.5 = 0
    #   t=0: delta = -0.25                              A0 = -0.25 + 0.5 * 0 = -0.25
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[-0.25, 0.0, 0.5, 0.0]]))


def test_group_advantages_hand_worked():
    # Group 1: scores 1, 0, 0, 1; mean 0.5; sample std sqrt(4 * 0.25 / 3) = 0.57735;
    # advantages +-0.5 / (0.57735 + 1e-4) = +-0.86588. Group 2: all equal, so all 0.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(scores, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))


def test_group_advantages_equal_scores_zero():
    advantages = group_advantages(torch.full((6,), 0.7), group_size=3)
    assert torch.equal(advantages, torch.zeros(6))


def test_k3_kl_values():
    # pi = 0.5, pi_ref = 0.25: r = 0.5, k3 = 0.5 - ln 0.5 - 1 = 0.19315.
    logprobs = torch.log(torch.tensor([0.5, 0.3]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.3]))
    torch.testing.assert_close(k3_kl(logprobs, ref_logprobs), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_clipped_surrogate_cases():
    # ratio 1.5 and eps 0.2. A = 1: max(-1.5, -1.2) = -1.2, the clipped term.
    # A = -1: max(1.5, 1.2) = 1.5, unclipped. Ratio 1 and A = 2: -2, unclipped.
    logprobs = torch.log(torch.tensor([1.5, 1.5, 1.0]))
    old = torch.zeros(3)
    losses, clipped = clipped_surrogate(logprobs, old, torch.tensor([1.0, -1.0, 2.0]), clip_eps=0.2)
    torch.testing.assert_close(losses, torch.tensor([-1.2, 1.5, -2.0]))
    assert clipped.tolist() == [1.0, 0.0, 0.0]


def test_clipped_value_loss_cases():
    # V_old 0.5, V 1.0, return 2, clip 0.2: V_clip = 0.7; 0.5 * max(1, 1.69) = 0.845, clipped.
    # V_old 0.5, V 0.6, return 2: inside the clip range, 0.5 * 1.4^2 = 0.98.
    losses, clipped = clipped_value_loss(torch.tensor([1.0, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]),
                                         clip=0.2)
    torch.testing.assert_close(losses, torch.tensor([0.845, 0.98]))
    assert clipped.tolist() == [1.0, 0.0]


def test_kl_controller_adapts():
    # KL 12 against target 6: error clipped to 0.2; 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002.
    controller = KLController(0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_replies=100)
    assert controller.coef == pytest.approx(0.1002)
    fixed = KLController(0.1)
    fixed.update(12.0, n_replies=100)
    assert fixed.coef == 0.1


# ---------------------------------------------------------------------------
# Rollouts


def test_logprobs_match_sampler(tokenizer, monkeypatch):
    """The log-probabilities recomputed for training equal log softmax(logits / T) of the
    logits the sampler drew each token from."""
    model = PolicyWithValueHead(tiny_gpt(tokenizer.vocab_size), value_head=True)
    recorded = []
    original = gpt.generate.sample_next

    def recording_sample_next(logits, token_ids, params, generator=None, uniforms=None):
        tokens = original(logits, token_ids, params, generator, uniforms)
        recorded.append((logits.float() / params.temperature).log_softmax(-1).gather(-1, tokens[:, None])[:, 0])
        return tokens

    monkeypatch.setattr(gpt.generate, "sample_next", recording_sample_next)
    cfg = small_config()
    prompts = task_prompts(tokenizer, 6)
    rollout = collect_rollout(model, copy.deepcopy(model.gpt), tokenizer, prompts, length_scorer, 0.05, cfg, seed=3)

    lengths = rollout.mask.sum(-1).long().tolist()
    assert max(lengths) > 1  # the engine's batch shrinks as rows stop, which the mapping below follows
    for position, step_logprobs in enumerate(recorded):
        active = [row for row in range(len(prompts)) if lengths[row] > position]  # the engine keeps row order
        torch.testing.assert_close(rollout.logprobs[active, position], step_logprobs, atol=1e-5, rtol=1e-5)


def test_first_minibatch_ratio_one(tokenizer):
    model = PolicyWithValueHead(tiny_gpt(tokenizer.vocab_size), value_head=True)
    reference = copy.deepcopy(model.gpt)
    cfg = small_config()
    rollout = collect_rollout(model, reference, tokenizer, task_prompts(tokenizer, 8), length_scorer, 0.05, cfg, seed=0)
    assert rollout.stats["objective/kl"] == 0.0
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)

    rows = torch.tensor([5, 0, 3])  # a minibatch of other rows than the rollout's chunks
    out = reply_forward(model.gpt, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_width,
                        cfg.temperature, tokenizer.vocab_size, model.value_head)
    ratio = torch.exp(out.logprobs - rollout.logprobs[rows]) * rollout.mask[rows]
    torch.testing.assert_close(ratio, rollout.mask[rows], atol=1e-5, rtol=0)

    # One minibatch holding the whole rollout: nothing has moved when its loss is computed.
    cfg.ppo_epochs, cfg.train.batch_size = 1, 8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = update(model, optimizer, rollout, cfg, tokenizer.vocab_size, torch.Generator().manual_seed(0))
    assert stats["policy/clipfrac"] == 0.0
    assert stats["policy/approxkl"] < 1e-10


def test_grpo_rollout_groups(tokenizer):
    model = PolicyWithValueHead(tiny_gpt(tokenizer.vocab_size), value_head=False)
    cfg = small_config(algorithm="grpo", group_size=4)
    rollout = collect_rollout(model, copy.deepcopy(model.gpt), tokenizer, task_prompts(tokenizer, 3), length_scorer,
                              0.05, cfg, seed=1)
    assert rollout.input_ids.shape[0] == 12
    assert rollout.values is None
    expected = group_advantages(rollout.scores, 4)[:, None] * rollout.mask
    torch.testing.assert_close(rollout.advantages, expected)


# ---------------------------------------------------------------------------
# Prompts and scores


class RecordingRewardModel:
    def __init__(self) -> None:
        self.rows = []

    def score(self, rows):
        self.rows = rows
        return torch.zeros(len(rows))


def test_reward_scorer_renders_reply(tokenizer):
    messages = [{"role": "user", "content": "Who are you?"}]
    prompt = Prompt(render_prompt(tokenizer, messages))
    reply = tokenizer.encode("I am a helper.")
    end, eot = tokenizer.special_id("<|end|>"), tokenizer.eot_id
    completions = [Completion(reply + [end], "stop", "I am a helper."),  # stopped by <|end|>
                   Completion(reply + [eot], "stop", "I am a helper."),  # stopped by <|endoftext|>
                   Completion(reply, "length", "I am a helper.")]  # cut at max_new_tokens
    model = RecordingRewardModel()
    reward_model_scorer(model, tokenizer)([prompt] * 3, completions)
    rendered = render_chat(tokenizer, messages + [{"role": "assistant", "content": "I am a helper."}])[0]
    assert model.rows[0] == rendered
    assert model.rows[1] == rendered
    assert model.rows[2] == rendered[:-1]  # no closing <|end|>


def test_data_prompts_from_chat_data(tokenizer):
    cfg = small_config(task="", reward="unused", prompts="identity", eval_prompts=5)
    prompts = DataPrompts(cfg, tokenizer, max_prompt_tokens=56)
    assert len(prompts.heldout) == 5
    assert prompts.train
    assistant_id = tokenizer.special_id("<|assistant|>")
    assert all(p.ids[-1] == assistant_id for p in prompts.train + prompts.heldout)
    assert all(len(p.ids) <= 56 for p in prompts.train)


def test_data_prompts_too_long(tokenizer):
    cfg = small_config(task="", reward="unused", prompts="identity", eval_prompts=5)
    with pytest.raises(ValueError, match="no training prompts left"):
        DataPrompts(cfg, tokenizer, max_prompt_tokens=3)


# ---------------------------------------------------------------------------
# Short runs of the stage


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


def test_ppo_trains_every_parameter(policy_dir, reward_dir, tmp_path):
    out = tmp_path / "ppo"
    cfg = build_config(PPOConfig, overrides={
        "policy": str(policy_dir), "reward": str(reward_dir), "out_dir": str(out), "prompts": "identity",
        "eval_prompts": "4", "prompts_per_step": "8", "max_new_tokens": "8", "temperature": str(TEMPERATURE),
        "train.max_steps": "2", "train.batch_size": "4", "train.lr": "1e-3", "train.device": "cpu"})
    summary = train(cfg)

    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert sorted(changed_tensors(before, after)) == sorted(before)
    head = load_file(str(out / VALUE_HEAD_FILE))
    assert all(tensor.abs().sum() > 0 for tensor in head.values())  # both start at zero
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("objective/reward", "objective/kl", "policy/clipfrac", "policy/approxkl", "loss/value",
                "policy/entropy", "reply/length"):
        assert key in records[-1], key
    assert "eval/reward" in summary["before"]
    assert "eval/reward" in summary["after"]


def test_grpo_trains_every_parameter(policy_dir, tmp_path):
    out = tmp_path / "grpo"
    # format_reward 0.5 gives a random model's replies different scores (with or without a digit).
    cfg = build_config(PPOConfig, overrides={
        "policy": str(policy_dir), "task": "arithmetic", "algorithm": "grpo", "out_dir": str(out),
        "arithmetic.format_reward": "0.5", "eval_prompts": "8", "prompts_per_step": "4", "group_size": "4",
        "max_new_tokens": "8", "temperature": str(TEMPERATURE), "train.max_steps": "2", "train.batch_size": "8",
        "train.lr": "1e-3", "train.device": "cpu"})
    summary = train(cfg)

    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert sorted(changed_tensors(before, after)) == sorted(before)
    assert not (out / VALUE_HEAD_FILE).exists()
    assert "task/accuracy" in summary["after"]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0  # the accuracy before training
    assert "task/accuracy" in first


def test_lora_trains_adapters_only(policy_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = build_config(PPOConfig, overrides={
        "policy": str(policy_dir), "task": "arithmetic", "algorithm": "grpo", "out_dir": str(out),
        "arithmetic.format_reward": "0.5", "eval_prompts": "0", "prompts_per_step": "4", "group_size": "4",
        "max_new_tokens": "8", "temperature": str(TEMPERATURE), "train.max_steps": "3", "train.batch_size": "16",
        "train.lr": "1e-2", "train.device": "cpu", "lora_r": "2", "lora_targets": "q_proj,v_proj"})
    train(cfg)

    state = load_train_state(out)["model"]
    base = load_file(str(policy_dir / "model.safetensors"))
    lora_b = [name for name in state if "lora_B" in name]
    assert len(lora_b) == 4  # q_proj and v_proj in each of 2 blocks
    assert all(state[name].abs().sum() > 0 for name in lora_b)  # peft starts B at zero
    frozen = {name.replace("policy.base_model.model.", "").replace(".base_layer", ""): t for name, t in state.items()
              if "lora_" not in name}
    assert all(torch.equal(frozen[name], base[name]) for name in base)
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = load_model(out)
    assert not torch.equal(merged.blocks[0].attn.q_proj.weight, base["blocks.0.attn.q_proj.weight"])


def test_resume_continues(policy_dir, tmp_path):
    out = tmp_path / "resume"
    overrides = {"policy": str(policy_dir), "task": "arithmetic", "algorithm": "grpo", "out_dir": str(out),
                 "arithmetic.format_reward": "0.5", "eval_prompts": "4", "prompts_per_step": "2", "group_size": "2",
                 "max_new_tokens": "4", "train.batch_size": "4", "train.device": "cpu",
                 "train.checkpoint_interval": "1"}
    train(build_config(PPOConfig, overrides={**overrides, "train.max_steps": "1"}))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    summary = train(build_config(PPOConfig, overrides={**overrides, "train.max_steps": "2", "train.resume": "true"}))
    assert summary["steps"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert summary["before"]["task/accuracy"] == first["task/accuracy"]


# ---------------------------------------------------------------------------
# Settings


def test_config_needs_one_reward():
    with pytest.raises(ConfigError, match="exactly one of reward"):
        build_config(PPOConfig, overrides={"policy": "p", "reward": "r", "task": "arithmetic"})
    with pytest.raises(ConfigError, match="exactly one of reward"):
        build_config(PPOConfig, overrides={"policy": "p"})


def test_config_grpo_group_size():
    with pytest.raises(ConfigError, match="group_size must be at least 2"):
        build_config(PPOConfig, overrides={"policy": "p", "task": "arithmetic", "algorithm": "grpo", "group_size": "1"})


def test_config_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'algebra'"):
        build_config(PPOConfig, overrides={"policy": "p", "task": "algebra"})


def test_world_size_must_divide():
    cfg = small_config(prompts_per_step=4)
    cfg.train.grad_accum = 2
    check_world_size(cfg, world_size=2)
    cfg.prompts_per_step = 3
    with pytest.raises(ValueError, match=r"prompts_per_step \(3\) must be a multiple of the number of processes \(2\)"):
        check_world_size(cfg, world_size=2)
    cfg.prompts_per_step, cfg.train.grad_accum = 4, 3
    with pytest.raises(ValueError, match=r"train.grad_accum \(3\) must be a multiple of the number of processes \(2\)"):
        check_world_size(cfg, world_size=2)


def test_out_dir_is_policy(policy_dir):
    cfg = build_config(PPOConfig, overrides={"policy": str(policy_dir), "task": "arithmetic", "out_dir": str(policy_dir)})
    with pytest.raises(ValueError, match="is the policy's checkpoint folder"):
        train(cfg)


def test_resume_without_state_fails_early(policy_dir, tmp_path):
    cfg = build_config(PPOConfig, overrides={"policy": str(policy_dir), "task": "arithmetic",
                                             "out_dir": str(tmp_path / "ppo"), "train.resume": True})
    with pytest.raises(FileNotFoundError, match="no resume state"):
        train(cfg)
