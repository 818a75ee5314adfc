"""Tests of the SFT stage: packing against separate examples, the loss mask and the
batch source's resume state. The smoke runs of `gptlab sft` (full and LoRA) fine-tune a
tiny base, pretrained on the real corpus, on the real instruction data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune.sft import (
    ChatBatches,
    SFTConfig,
    collate,
    example_targets,
    load_examples,
    pack_rows,
    sft_loss,
    train,
)
from gpt.chat import render_chat
from gpt.checkpoint import load_model
from gpt.lora import add_lora, load_adapter
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer
from gptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

# Real instruction sets, a few conversations of each; chitchat is left out because parsing
# its 40 MB file dominates a short test.
DATA = "gpteacher,taskmaster4,identity:2"
# Settings shared by the smoke runs: tiny, float32, no matmul peak measurement.
SMALL = ["--data", DATA, "--max_examples", "12", "--heldout_fraction", "0.25", "--train.batch_size", "4",
         "--train.dtype", "float32", "--train.device", "cpu", "--train.peak_tflops", "1", "--train.warmup_steps", "0",
         "--eval_tokens", "6", "--train.eval_batches", "2"]


def random_examples(lengths: list[int], vocab_size: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Examples with random ids and a chat-like mask: a 0 for the leading tokens, random after."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        mask = [0, 0] + torch.randint(0, 2, (length - 2,), generator=generator).tolist()
        mask[-1] = 1
        examples.append((ids, mask))
    return examples


def tiny_model(pos_encoding: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=32, pos_encoding=pos_encoding)
    return GPT(config).eval()


def summed_loss(model: GPT, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return sft_loss(model, batch)[0]


def loss_alone(model: GPT, example: tuple[list[int], list[int]]) -> torch.Tensor:
    """The summed loss of one example run by itself, with no mask and default positions."""
    ids, mask = example
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([example_targets(ids, mask)]), loss_reduction="sum").loss


def test_example_targets_by_hand():
    ids = [10, 11, 12, 13, 14, 15]
    mask = [0, 0, 1, 1, 0, 1]
    assert example_targets(ids, mask) == [-100, 12, 13, -100, 15, -100]




@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_packed_loss_equals_separate(pos_encoding):
    model = tiny_model(pos_encoding)
    examples = random_examples([7, 5, 9, 3, 11], vocab_size=50)
    # Two packed rows, the second one shorter, so it is padded.
    packed = collate([examples[:3], examples[3:]], pack=True)
    assert packed["input_ids"].shape == (2, 21)
    separate = sum(loss_alone(model, example) for example in examples)
    torch.testing.assert_close(summed_loss(model, packed), separate, atol=1e-5, rtol=0)
    assert packed["n_targets"] == sum(sum(mask[1:]) for _, mask in examples)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_packed_logits_equal_alone(pos_encoding):
    model = tiny_model(pos_encoding)
    examples = random_examples([6, 10, 4], vocab_size=50, seed=1)
    packed = collate([examples], pack=True)
    with torch.no_grad():
        logits = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits
        start = 0
        for ids, _ in examples:
            alone = model(torch.tensor([ids])).logits
            torch.testing.assert_close(logits[:, start:start + len(ids)], alone, atol=1e-5, rtol=0)
            start += len(ids)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_padded_loss_equals_separate(pos_encoding):
    model = tiny_model(pos_encoding)
    examples = random_examples([7, 12, 3], vocab_size=50, seed=2)
    padded = collate([[example] for example in examples], pack=False)
    assert padded["attention_mask"].tolist()[2] == [1] * 3 + [0] * 9
    assert (padded["targets"][2, 3:] == -100).all()
    separate = sum(loss_alone(model, example) for example in examples)
    torch.testing.assert_close(summed_loss(model, padded), separate, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = (REPO / "gpt" / "model.py").read_text(encoding="utf-8")[:20_000]
    return Tokenizer.train([text[i:i + 1000] for i in range(0, len(text), 1000)], vocab_size=300)


def test_targets_masked_where_chat_mask_is_zero(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                    {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": "Green, of course."}]
    ids, mask = render_chat(tokenizer, conversation)
    batch = collate([[(ids, mask)], [(ids[:5], mask[:5])]], pack=False)
    targets = batch["targets"][0].tolist()
    for t in range(len(ids) - 1):
        assert targets[t] == (ids[t + 1] if mask[t + 1] else -100), t
    assert targets[-1] == -100
    assert batch["n_targets"] == sum(mask)


def test_pack_rows_fits_each_example_once():
    lengths = [60, 10, 30, 34, 5, 64, 3, 20]
    rows = pack_rows(lengths, block_size=64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # 226 tokens need at least 4 rows of 64; best-fit decreasing reaches that here.
    assert len(rows) == 4


def collect(batches, n: int) -> list[torch.Tensor]:
    iterator = iter(batches)
    return [next(iterator)["input_ids"] for _ in range(n)]


def test_batches_resume_exactly():
    examples = random_examples([3 + i % 7 for i in range(23)], vocab_size=50)
    full = collect(ChatBatches(examples, 16, batch_size=3, seed=5, pack=True), 12)  # several epochs
    first = ChatBatches(examples, 16, batch_size=3, seed=5, pack=True)
    collect(first, 5)
    resumed = ChatBatches(examples, 16, batch_size=3, seed=5, pack=True)
    resumed.load_state_dict(first.state_dict())
    for expected, found in zip(full[5:], collect(resumed, 7)):
        assert torch.equal(expected, found)


def test_batches_epoch_visits_every_row():
    examples = random_examples([4] * 12, vocab_size=50)
    batches = ChatBatches(examples, 8, batch_size=2, seed=0, pack=True)
    assert len(batches.rows) == 6
    seen = torch.cat(collect(batches, 3)).view(-1, 4)
    expected = torch.tensor([ids for ids, _ in examples])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))


def test_batches_split_over_ranks():
    examples = random_examples([3 + i % 5 for i in range(20)], vocab_size=50)
    single = collect(ChatBatches(examples, 12, batch_size=2, seed=1, pack=False), 4)
    ranks = [collect(ChatBatches(examples, 12, batch_size=2, seed=1, pack=False, rank=r, world_size=2), 2)
             for r in range(2)]
    assert torch.equal(ranks[0][0], single[0])
    assert torch.equal(ranks[1][0], single[1])
    assert torch.equal(ranks[1][1], single[3])


# ---------------------------------------------------------------------------
# A tiny base model pretrained on the real corpus


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """runs/NAME/pretrain of a 2-layer model with block_size 64, pretrained for 5 steps."""
    if not DATA_DIR:
        pytest.skip("GPTLAB_DATA_DIR is not set")
    run = tmp_path_factory.mktemp("run")
    code = main(["pretrain", "--preset", "tiny", "--out-dir", str(run), "--data.vocab_size", "512",
                 "--model.block_size", "64", "--model.n_embd", "32", "--train.batch_size", "4",
                 "--train.dtype", "float32", "--sample_tokens", "0", "--train.max_steps", "5",
                 "--train.eval_batches", "1", "--train.peak_tflops", "1"])
    assert code == 0
    return run / "pretrain"


@pytest.fixture(scope="module")
def examples(base) -> list:
    cfg = SFTConfig(base=str(base), data=DATA, max_examples=12)
    train_examples, _ = load_examples(cfg, Tokenizer.from_file(base / "tokenizer.json"), 64)
    return train_examples


class OneBatch:
    """A batch source that repeats one micro-batch."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_trainer(model, batches, out_dir: Path, steps: int, lr: float) -> list[float]:
    cfg = TrainConfig(batch_size=4, max_steps=steps, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                      device="cpu", dtype="float32", eval_interval=0, checkpoint_interval=steps)
    Trainer(model, cfg, out_dir, batches, Hooks(loss_fn=sft_loss)).run()
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.parametrize("lora_r", [0, 4])
def test_every_trainable_parameter_changes(base, examples, tmp_path, lora_r):
    model = load_model(base)
    if lora_r:
        model = add_lora(model, r=lora_r, alpha=8, dropout=0.0, targets="all")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    # Three steps: LoRA's A gets no gradient while B is still zero, in the first step.
    run_trainer(model, ChatBatches(examples, 64, 4, seed=0, pack=True), tmp_path, steps=3, lr=1e-3)
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    # LoRA: A and B on six projections (q, k, v, o, up, down) of two blocks.
    assert len(before) == (2 * 6 * 2 if lora_r else len(list(load_model(base).parameters())))


# LoRA leaves the tied embedding and the final norm of this barely trained base frozen at
# their small initial values, which bounds every logit to about |norm_f(h)| * |wte row|
# (under 1 here), so its loss cannot fall far from ln(vocab_size).
@needs_data
@pytest.mark.parametrize("lora_r,lr,drop", [(0, 1e-2, 1.0), (8, 3e-2, 0.1)])
def test_loss_falls_on_one_batch(base, examples, tmp_path, lora_r, lr, drop):
    torch.manual_seed(0)
    model = load_model(base)
    if lora_r:
        model = add_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0, targets="all")
    batch = next(iter(ChatBatches(examples, 64, 4, seed=0, pack=True)))
    losses = run_trainer(model, OneBatch(batch), tmp_path, steps=25, lr=lr)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - drop


@needs_data
def test_block_size_above_base_is_error(base, tmp_path):
    cfg = SFTConfig(base=str(base), out_dir=str(tmp_path / "sft"), block_size=65)
    with pytest.raises(ValueError, match="block_size 65 is larger than the base model's block_size 64"):
        train(cfg)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@needs_data
def test_sft_full_smoke(base, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--base", str(base), "--out-dir", str(out), *SMALL, "--train.max_steps", "4",
                 "--train.eval_interval", "2"]) == 0
    for name in ("model.safetensors", "model.json", "tokenizer.json", "config.yaml", "metrics.jsonl", "loss.png",
                 "train_state.pt", "summary.json"):
        assert (out / name).is_file(), name
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "val_loss" in records[1]
    assert "val_loss" in records[3]
    meta = json.loads((out / "model.json").read_text())
    assert meta["sft"]["base"] == str(base)
    assert meta["sft"]["lora"] is None


@needs_data
def test_sft_default_out_dir(base):
    assert main(["sft", "--base", str(base), *SMALL, "--train.max_steps", "1", "--eval_tokens", "0"]) == 0
    assert (base.parent / "sft" / "model.safetensors").is_file()


@needs_data
def test_sft_lora_smoke(base, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--base", str(base), "--out-dir", str(out), *SMALL, "--train.max_steps", "3",
                 "--lora_r", "4", "--lora_targets", "q_proj,v_proj,down_proj", "--train.lr", "1e-2"]) == 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model.safetensors",
                 "model.json", "tokenizer.json", "config.yaml", "train_state.pt"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model.json").read_text())
    assert meta["sft"]["lora"] == {"r": 4, "alpha": 16.0, "targets": "q_proj,v_proj,down_proj"}
    # The merged weights in model.safetensors equal the base with the saved adapter.
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_adapter(load_model(base), out / "adapter").eval()(idx).logits
        merged = load_model(out).eval()(idx).logits
        plain = load_model(base).eval()(idx).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, plain, atol=1e-4)


@needs_data
@pytest.mark.parametrize("lora", [[], ["--lora_r", "4", "--lora_dropout", "0.1"]], ids=["full", "lora"])
def test_sft_resume_matches_uninterrupted(base, tmp_path, lora):
    # A constant schedule makes the first run's learning rates independent of max_steps.
    # LoRA dropout draws random numbers, so the resumed run also needs the saved RNG state.
    common = [*SMALL, "--train.schedule", "constant", "--train.checkpoint_interval", "2", "--train.eval_interval",
              "0", "--eval_tokens", "0", *lora]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["sft", "--base", str(base), "--out-dir", str(straight), *common, "--train.max_steps", "4"]) == 0
    assert main(["sft", "--base", str(base), "--out-dir", str(resumed), *common, "--train.max_steps", "2"]) == 0
    assert main(["sft", "--base", str(base), "--out-dir", str(resumed), *common, "--train.max_steps", "4",
                 "--resume"]) == 0
    expected, found = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in found] == [1, 2, 3, 4]
    assert [r["loss"] for r in found] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    for name, tensor in load_model(straight).state_dict().items():
        torch.testing.assert_close(load_model(resumed).state_dict()[name], tensor, atol=1e-6, rtol=0)


@needs_data
def test_resume_with_other_lora_is_error(base, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--base", str(base), "--out-dir", str(out), *SMALL, "--train.max_steps", "1",
                 "--eval_tokens", "0"]) == 0
    code = main(["sft", "--base", str(base), "--out-dir", str(out), *SMALL, "--train.max_steps", "2", "--resume",
                 "--lora_r", "4"])
    assert code == 2
    assert "records LoRA settings None" in capsys.readouterr().err


def test_resume_without_state_fails_before_data(base, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["sft", "--base", str(base), "--out-dir", str(tmp_path / "sft"), "--data", str(missing),
                 "--resume"]) == 2
    assert "no resume state" in capsys.readouterr().err
