"""Tests of rlhf/reward.py: where the reward is read under padding, scoring conversations,
the Bradley-Terry loss by hand, saving and loading, and smoke runs of the reward trainer on
a tiny GPT whose tokenizer is trained on real text.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt.chat import render_chat
from gpt.checkpoint import load_model, save_model
from gpt.data import iter_texts, load_documents
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer
from gptlab.cli import main
from rlhf.losses import bradley_terry_loss
from rlhf.pair_batches import PairBatches, collate_pairs, tokenize_pairs
from rlhf.preference_data import load_pairs
from rlhf.reward import HEAD_FILE, RewardModel, load_reward_model, reward_loss, save_reward_model

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
BLOCK = 64
CONVERSATIONS = [
    [{"role": "user", "content": "Is the sea salty?"}, {"role": "assistant", "content": "Yes, it is."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "An apple."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help you today?"}],
]
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital.", "rejected": "I do not know."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A hammer."},
    {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three, two, one."},
    {"prompt": "Is the sea salty?", "chosen": "Yes, sea water is salty.", "rejected": "No."},
    {"prompt": "Give me a color.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "What do cows drink?", "chosen": "Water.", "rejected": "Milk, of course."},
    {"prompt": "Spell cat.", "chosen": "C, A, T.", "rejected": "K, A, T."},
    {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Goodbye."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level BPE trained on Shakespeare when the data kit is there, else on this repository's code."""
    if DATA_DIR:
        texts = list(iter_texts(load_documents("tinyshakespeare")))[:2000]
    else:
        text = "".join(p.read_text() for p in sorted((REPO / "rlhf").glob("*.py")))
        texts = [text[i:i + 500] for i in range(0, len(text), 500)]
    return Tokenizer.train(texts, vocab_size=400)


def tiny_reward_model(tokenizer: Tokenizer | None = None, layout: str = "gpt2", seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    config = ModelConfig.from_layout(layout, vocab_size=400, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK)
    return RewardModel(GPT(config), tokenizer).eval()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PAIRS))
    return path


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "sft"
    folder.mkdir()
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=400, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK)), folder,
               tokenizer_file=folder / "tokenizer.json", step=0)
    return folder


def test_bradley_terry_by_hand():
    # r_chosen - r_rejected = 1.5 - 0.5 = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.313261687518...
    # and 0 - 2 = -2, loss = log(1 + e^2) = 2.126928011042...
    losses = bradley_terry_loss(torch.tensor([1.5, 0.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert losses.tolist() == pytest.approx([0.31326168751822286, 2.1269280110429727], abs=1e-12)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_reward_same_under_left_and_right_padding(tokenizer, layout):
    model = tiny_reward_model(tokenizer, layout)
    rows = [render_chat(tokenizer, c)[0] for c in CONVERSATIONS]
    T = max(len(r) for r in rows) + 3
    right_ids, left_ids = torch.ones(3, T, dtype=torch.long), torch.ones(3, T, dtype=torch.long)
    right_mask, left_mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, row in enumerate(rows):
        right_ids[i, :len(row)], right_mask[i, :len(row)] = torch.tensor(row), 1
        left_ids[i, T - len(row):], left_mask[i, T - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        right, left = model(right_ids, right_mask), model(left_ids, left_mask)
        alone = torch.cat([model(torch.tensor([row])) for row in rows])
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_reward_read_at_last_real_token(tokenizer):
    model = tiny_reward_model(tokenizer)
    ids = torch.tensor([[7, 8, 9, 1, 1], [1, 1, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        hidden = model.gpt(ids, attention_mask=mask, return_hidden=True, compute_logits=False).hidden
        expected = model.head(torch.stack([hidden[0, 2], hidden[1, 4]])).squeeze(-1)
        assert torch.equal(model(ids, mask), expected)


def test_score_conversations(tokenizer):
    model = tiny_reward_model(tokenizer)
    scores = model.score(CONVERSATIONS, batch_size=2)
    with torch.no_grad():
        one_by_one = torch.cat([model(torch.tensor([render_chat(tokenizer, c)[0]])) for c in CONVERSATIONS])
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.score([render_chat(tokenizer, c)[0] for c in CONVERSATIONS]), scores)


def test_score_needs_tokenizer():
    with pytest.raises(ValueError, match="scoring conversations needs the tokenizer"):
        tiny_reward_model().score(CONVERSATIONS)


def test_save_and_load(tokenizer, tmp_path):
    model = tiny_reward_model(tokenizer)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    tokenizer.save(tmp_path / "tokenizer.json")
    save_reward_model(model, tmp_path / "reward", tokenizer_file=tmp_path / "tokenizer.json", step=3)
    loaded = load_reward_model(tmp_path / "reward")
    assert json.loads((tmp_path / "reward" / "model.json").read_text())["reward_model"]["head"] == HEAD_FILE
    torch.testing.assert_close(loaded.score(CONVERSATIONS), model.score(CONVERSATIONS))
    assert isinstance(load_model(tmp_path / "reward"), GPT)  # the trunk is an ordinary checkpoint


def test_load_language_model_rejected(base_dir):
    with pytest.raises(ValueError, match="contains a language model, not a reward model"):
        load_reward_model(base_dir)


def test_untied_output_layer_frozen():
    model = tiny_reward_model(layout="llama")
    assert not model.gpt.lm_head.weight.requires_grad


def test_reward_offsets_frozen():
    # A shared offset cancels in r_chosen - r_rejected, so nothing that only shifts every reward trains.
    model = tiny_reward_model(layout="gpt2")
    assert model.head.bias is None
    assert not model.gpt.norm_f.bias.requires_grad


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_every_trainable_parameter_changes(tokenizer, pairs_file, tmp_path, layout):
    pairs, _ = load_pairs(str(pairs_file))
    tokenized, _ = tokenize_pairs(tokenizer, pairs, BLOCK)
    model = tiny_reward_model(tokenizer, layout).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, device="cpu", dtype="float32",
                      eval_interval=0, checkpoint_interval=100)
    Trainer(model, cfg, tmp_path, PairBatches(tokenized, 4, seed=0), Hooks(loss_fn=reward_loss)).run()
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(value) for value in losses)


def test_loss_falls_on_one_batch(tokenizer, pairs_file):
    pairs, _ = load_pairs(str(pairs_file))
    tokenized, _ = tokenize_pairs(tokenizer, pairs, BLOCK)
    batch = collate_pairs(tokenized)
    model = tiny_reward_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss_sum, n, _ = reward_loss(model, batch)
        losses.append(loss_sum.item() / n)
        optimizer.zero_grad()
        (loss_sum / n).backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_reward_command(base_dir, pairs_file, tmp_path):
    out = tmp_path / "reward"
    status = main(["reward", "--base", str(base_dir), "--out_dir", str(out), "--data.source", str(pairs_file),
                   "--data.heldout_fraction", "0.25", "--train.max_steps", "3", "--train.batch_size", "4",
                   "--train.dtype", "float32", "--train.device", "cpu", "--train.peak_tflops", "1",
                   "--train.warmup_steps", "0", "--train.lr", "1e-3"])
    assert status == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin"} <= set(records[0])
    assert {"val_loss", "val_accuracy", "val_margin"} <= set(records[-1])
    model = load_reward_model(out)
    assert model.score(CONVERSATIONS).shape == (3,)
    start = dict(RewardModel(load_model(base_dir)).named_parameters())
    unchanged = [name for name, p in model.named_parameters()
                 if start[name].requires_grad and name != "head.weight" and torch.equal(p, start[name])]
    assert unchanged == []


def test_resume_without_state_fails_before_data(base_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["reward", "--base", str(base_dir), "--out-dir", str(tmp_path / "reward"), "--data.source",
                 str(missing), "--resume"]) == 2
    assert "no resume state" in capsys.readouterr().err
