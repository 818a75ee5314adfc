"""Tests of rlhf/losses.py and rlhf/dpo.py: the DPO, IPO and cDPO losses against numbers
worked out by hand and against TRL, and ln 2 at the start. Sequence log-probs are checked
under padding and packing. Smoke runs of full and LoRA DPO train a tiny GPT whose
tokenizer is trained on real text.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer

from gpt.checkpoint import load_model, save_model
from gpt.data import iter_texts, load_documents
from gpt.lora import add_lora, read_adapter
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gpt.training import Hooks, TrainConfig, Trainer
from gptlab.cli import main
from rlhf.dpo import DPOConfig, Reference, batch_logprobs, disable_dropout, make_loss_fn
from rlhf.losses import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    preference_loss,
    sequence_logprobs,
    token_logprobs,
)
from rlhf.pair_batches import PairBatches, collate_pairs, tokenize_pairs
from rlhf.preference_data import load_pairs
from rlhf.preference_formats import PreferencePair

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
BLOCK = 64
SMALL = ["--train.max_steps", "3", "--train.batch_size", "4", "--train.dtype", "float32", "--train.device", "cpu",
         "--train.peak_tflops", "1", "--train.warmup_steps", "0", "--train.eval_batches", "2",
         "--data.heldout_fraction", "0.25"]


def tensors(*values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in values]


# ---------------------------------------------------------------------------------------------
# Losses by hand


def test_dpo_loss_by_hand():
    # beta = 0.5. Pair 1: h = (-10 - -11) - (-12 - -11) = 1 + 1 = 2, beta h = 1,
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.313261687518...
    # Pair 2: h = (-5 - -5) - (-4 - -5) = 0 - 1 = -1, beta h = -0.5,
    # loss = log(1 + e^0.5) = 0.974076984180...
    pc, pr, rc, rr = tensors([-10.0, -5.0], [-12.0, -4.0], [-11.0, -5.0], [-11.0, -5.0])
    losses = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([0.31326168751822286, 0.9740769841801067], abs=1e-12)


def test_ipo_loss_by_hand():
    # beta (tau) = 0.25, so the target margin is 1 / (2 * 0.25) = 2; log-probs are per-token means.
    # Pair 1: h = (-2 - -2.5) - (-3 - -2.5) = 0.5 + 0.5 = 1, loss = (1 - 2)^2 = 1.
    # Pair 2: h = (-1 - -2) - (-3 - -2) = 1 + 1 = 2, loss = (2 - 2)^2 = 0.
    # Pair 3: h = 0, loss = (0 - 2)^2 = 4.
    pc, pr, rc, rr = tensors([-2.0, -1.0, -1.0], [-3.0, -3.0, -1.0], [-2.5, -2.0, -1.0], [-2.5, -2.0, -1.0])
    assert ipo_loss(pc, pr, rc, rr, beta=0.25).tolist() == pytest.approx([1.0, 0.0, 4.0], abs=1e-12)


def test_cdpo_loss_by_hand():
    # beta = 1, eps = 0.1, h = (-1 - -2) - (-3 - -2) = 2.
    # -(1 - eps) log sigmoid(2) - eps log sigmoid(-2) = -log sigmoid(2) + eps * 2
    # (because log sigmoid(x) - log sigmoid(-x) = x) = log(1 + e^-2) + 0.2 = 0.126928011042... + 0.2.
    pc, pr, rc, rr = tensors([-1.0], [-3.0], [-2.0], [-2.0])
    loss = cdpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.12692801104297263 + 0.2, abs=1e-12)


def test_cdpo_without_smoothing_is_dpo():
    pc, pr, rc, rr = tensors([-3.0, -7.0], [-4.0, -2.0], [-3.5, -6.0], [-3.0, -2.5])
    assert torch.equal(cdpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.0), dpo_loss(pc, pr, rc, rr, beta=0.3))


def test_dpo_loss_at_start_is_ln2():
    logps = torch.tensor([-17.25, -3.5])
    loss = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.equal(loss, torch.full((2,), math.log(2), dtype=torch.float32))


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown preference loss 'kto'; choose one of dpo, ipo, cdpo"):
        preference_loss("kto", beta=0.1)


# ---------------------------------------------------------------------------------------------
# Against TRL
#
# TRL 1.16 has no standalone DPO loss function: the loss is computed inside
# DPOTrainer._compute_loss from the model's per-token log-probs. Building a trainer needs a
# model, a tokenizer and a dataset. Instead the tests call _compute_loss unbound on a
# stand-in `self` with only the attributes it reads. Its stand-in model returns per-token
# log-probs whose row sums are the given sequence log-probs, and precompute_ref_logps=True
# makes it read the reference log-probs from the batch.


def trl_loss(loss_type: str, beta: float, policy: tuple[torch.Tensor, torch.Tensor],
             reference: tuple[torch.Tensor, torch.Tensor], counts: tuple[list[int], list[int]],
             label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL's mean loss over the pairs, for summed policy log-probs (chosen, rejected) and reply lengths."""
    sums = torch.cat(policy)  # (2B,): chosen rows, then rejected rows, as TRL batches them
    lengths = counts[0] + counts[1]
    T = max(lengths) + 1
    completion_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, length in enumerate(lengths):
        completion_mask[row, T - length:] = 1
    per_token = torch.zeros(len(lengths), T - 1, dtype=sums.dtype)
    per_token[:, -1] = sums  # the rows sum to the sequence log-probs
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros(per_token.shape, dtype=torch.bool))
    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        accelerator=identity, model=SimpleNamespace(training=True), loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, f_divergence_type="reverse_kl", ld_alpha=None,
        precompute_ref_logps=True, aux_loss_enabled=False, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(len(lengths), T, dtype=torch.long),
              "attention_mask": torch.ones(len(lengths), T, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": reference[0], "ref_rejected_logps": reference[1]}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


@pytest.fixture
def logps() -> dict:
    generator = torch.Generator().manual_seed(0)
    counts = ([3, 7, 12, 1], [5, 2, 9, 4])
    policy = [-torch.rand(4, generator=generator, dtype=torch.float64) * torch.tensor(c, dtype=torch.float64)
              for c in counts]
    reference = [p + torch.randn(4, generator=generator, dtype=torch.float64) for p in policy]
    return {"policy": policy, "reference": reference, "counts": counts}


def test_dpo_matches_trl(logps):
    ours = dpo_loss(*logps["policy"], *logps["reference"], beta=0.2).mean()
    theirs = trl_loss("sigmoid", 0.2, logps["policy"], logps["reference"], logps["counts"])
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_ipo_matches_trl(logps):
    # Ours divides each sequence's log-probs by its reply length before the loss; TRL divides
    # the summed log-ratios by the same lengths. Both give (h / n - 1 / (2 beta))^2 per pair.
    chosen_n, rejected_n = (torch.tensor(c, dtype=torch.float64) for c in logps["counts"])
    (pc, pr), (rc, rr) = logps["policy"], logps["reference"]
    ours = ipo_loss(pc / chosen_n, pr / rejected_n, rc / chosen_n, rr / rejected_n, beta=0.5).mean()
    theirs = trl_loss("ipo", 0.5, logps["policy"], logps["reference"], logps["counts"])
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_cdpo_matches_trl(logps):
    # TRL 1.16's "sigmoid" ignores label_smoothing; "aot" applies the label-smoothed formula
    # to log-ratios sorted over the batch, which for a batch of one pair is cDPO.
    for i in range(4):
        policy = [p[i:i + 1] for p in logps["policy"]]
        reference = [r[i:i + 1] for r in logps["reference"]]
        counts = ([logps["counts"][0][i]], [logps["counts"][1][i]])
        ours = cdpo_loss(*policy, *reference, beta=0.3, label_smoothing=0.15)
        theirs = trl_loss("aot", 0.3, policy, reference, counts, label_smoothing=0.15)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# A tiny model and real text


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level BPE trained on Shakespeare when the data kit is there, else on this repository's code."""
    if DATA_DIR:
        texts = list(iter_texts(load_documents("tinyshakespeare")))[:2000]
    else:
        text = "".join(p.read_text() for p in sorted((REPO / "rlhf").glob("*.py")))
        texts = [text[i:i + 500] for i in range(0, len(text), 500)]
    return Tokenizer.train(texts, vocab_size=400)


def tiny_gpt(layout: str = "gpt2", seed: int = 0) -> GPT:
    """A 2-layer GPT in the gpt2 or llama layout, or with ALiBi positions."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=400, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK)
    if layout == "alibi":
        return GPT(ModelConfig(pos_encoding="alibi", **sizes))
    return GPT(ModelConfig.from_layout(layout, **sizes))


PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital.", "rejected": "I do not know."},
    {"prompt": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again, louder."}],
     "chosen": "HELLO!", "rejected": "hello."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A hammer."},
    {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three, two, one."},
    {"prompt": "Is the sea salty?", "chosen": "Yes, sea water is salty.", "rejected": "No."},
    {"prompt": "Give me a color.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "What do cows drink?", "chosen": "Water.", "rejected": "Milk, of course."},
    {"prompt": "Spell cat.", "chosen": "C, A, T.", "rejected": "K, A, T."},
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PAIRS))
    return path


@pytest.fixture(scope="module")
def batch(tokenizer, pairs_file) -> dict:
    pairs, _ = load_pairs(str(pairs_file))
    tokenized, _ = tokenize_pairs(tokenizer, pairs, BLOCK)
    return collate_pairs(tokenized[:4])


@pytest.fixture(scope="module")
def policy_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "sft"
    folder.mkdir()
    tokenizer.save(folder / "tokenizer.json")
    save_model(tiny_gpt("llama"), folder, tokenizer_file=folder / "tokenizer.json", step=0)
    return folder


# ---------------------------------------------------------------------------------------------
# Log-probabilities


def test_token_logprobs_match_log_softmax(batch):
    model = tiny_gpt().eval()
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["reply_mask"]
    with torch.no_grad():
        ours = token_logprobs(model, ids, attention, mask)
        logits = model(ids, attention_mask=attention).logits
    full = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    expected = torch.zeros_like(ours)
    expected[:, 1:] = torch.where(mask[:, 1:], full, 0.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_cover_reply_only(batch):
    _, counts = sequence_logprobs(tiny_gpt(), batch["input_ids"], batch["attention_mask"], batch["reply_mask"])
    assert counts.tolist() == batch["reply_mask"].sum(-1).tolist()
    assert not (batch["reply_mask"] & (batch["attention_mask"] == 0)).any()


@pytest.mark.parametrize("layout", ["gpt2", "llama", "alibi"])
def test_logprobs_ignore_padding(batch, layout):
    model = tiny_gpt(layout).eval()
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["reply_mask"]
    with torch.no_grad():
        plain = sequence_logprobs(model, ids, attention, mask)[0]
        extra = 5  # pad columns beyond the longest row
        right = sequence_logprobs(model, F.pad(ids, (0, extra), value=1), F.pad(attention, (0, extra)),
                                  F.pad(mask, (0, extra)))[0]
        # Left padding: move each row's tokens to the end of a wider row.
        lengths = attention.sum(-1)
        T = ids.size(1) + extra
        left_ids, left_attention = torch.ones(ids.size(0), T, dtype=torch.long), torch.zeros(ids.size(0), T, dtype=torch.long)
        left_mask = torch.zeros(ids.size(0), T, dtype=torch.bool)
        for row, n in enumerate(lengths.tolist()):
            left_ids[row, T - n:], left_attention[row, T - n:] = ids[row, :n], 1
            left_mask[row, T - n:] = mask[row, :n]
        left = sequence_logprobs(model, left_ids, left_attention, left_mask)[0]
    torch.testing.assert_close(right, plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(left, plain, atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module")
def packable(tokenizer, pairs_file) -> list:
    """The test pairs and one long pair, which makes rows long enough to hold several short sequences."""
    pairs, _ = load_pairs(str(pairs_file))
    pairs.append(PreferencePair([{"role": "user", "content": "Tell me a story."}], "Once upon a time " * 8, "No."))
    return tokenize_pairs(tokenizer, pairs, BLOCK)[0]


@pytest.mark.parametrize("layout", ["gpt2", "llama", "alibi"])
def test_packed_logprobs_match_unpacked(packable, layout):
    tokenized = packable
    packed, unpacked = collate_pairs(tokenized, pack=True), collate_pairs(tokenized)
    assert packed["input_ids"].size(0) < unpacked["input_ids"].size(0)
    model = tiny_gpt(layout).eval()
    with torch.no_grad():
        ours = batch_logprobs(model, packed)
        plain = batch_logprobs(model, unpacked)
    torch.testing.assert_close(ours[0], plain[0], atol=1e-5, rtol=1e-6)
    assert torch.equal(ours[1], plain[1])


def test_packed_first_token_rejected(packable):
    batch = collate_pairs(packable, pack=True)
    mask = batch["reply_mask"] | (batch["position_ids"] == 0) & (batch["segments"] >= 0)
    mask[:, 0] = False
    with pytest.raises(ValueError, match="mask marks the first token of a packed sequence"):
        sequence_logprobs(tiny_gpt(), batch["input_ids"], batch["attention_mask"], mask,
                          position_ids=batch["position_ids"], segments=batch["segments"])


def test_mask_at_position_zero_rejected(batch):
    mask = batch["reply_mask"].clone()
    mask[:, 0] = True
    with pytest.raises(ValueError, match="mask marks position 0"):
        token_logprobs(tiny_gpt(), batch["input_ids"], batch["attention_mask"], mask)


# ---------------------------------------------------------------------------------------------
# The stage's pieces


@pytest.mark.parametrize("lora, pack", [(False, False), (True, False), (False, True)])
def test_first_loss_is_ln2(tokenizer, pairs_file, lora, pack):
    pairs, _ = load_pairs(str(pairs_file))
    batch = collate_pairs(tokenize_pairs(tokenizer, pairs, BLOCK)[0], pack=pack)
    model = tiny_gpt()
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, targets="all")
    reference = Reference(model)
    loss_sum, n_pairs, metrics = make_loss_fn(reference, preference_loss("dpo", 0.1), 0.1, average=False)(model, batch)
    assert loss_sum.item() / n_pairs == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0


def test_lora_reference_holds_no_copy():
    model = add_lora(tiny_gpt(), r=4, alpha=8, dropout=0.0, targets="all")
    assert Reference(model).num_parameters() == 0


def test_full_reference_is_frozen_copy():
    model = tiny_gpt()
    reference = Reference(model)
    assert reference.num_parameters() == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in reference.copy.parameters())


def test_disable_dropout():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=400, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, dropout=0.3)).train()
    disable_dropout(model)
    ids = torch.randint(0, 400, (2, 10))
    assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("loss, lora", [("dpo", False), ("cdpo", True)])
def test_every_trainable_parameter_changes(tokenizer, pairs_file, tmp_path, loss, lora):
    pairs, _ = load_pairs(str(pairs_file))
    tokenized, _ = tokenize_pairs(tokenizer, pairs, BLOCK)
    model = tiny_gpt("llama")
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, targets="all")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    reference = Reference(model)
    loss_fn = preference_loss(loss, 0.1, 0.1 if loss == "cdpo" else 0.0)
    hooks = Hooks(loss_fn=make_loss_fn(reference, loss_fn, 0.1, average=loss == "ipo"))
    cfg = TrainConfig(batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, device="cpu", dtype="float32",
                      eval_interval=0, checkpoint_interval=100)
    summary = Trainer(model, cfg, tmp_path, PairBatches(tokenized, 4, seed=0, pack=True), hooks).run()
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    assert summary["steps"] == 3
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(value) for value in losses)


# ---------------------------------------------------------------------------------------------
# The command


def test_config_problems():
    cfg = DPOConfig(policy="", beta=0.0, loss="cdpo", label_smoothing=0.0, lora_r=2, lora_targets="qq_proj")
    problems = cfg.problems()
    assert any("policy is empty" in p for p in problems)
    assert any("beta must be positive" in p for p in problems)
    assert any("loss cdpo needs label_smoothing in (0, 0.5)" in p for p in problems)
    assert any("lora_targets 'qq_proj'" in p for p in problems)


def test_label_smoothing_needs_cdpo(capsys, policy_dir):
    status = main(["dpo", "--policy", str(policy_dir), "--label_smoothing", "0.1"])
    assert status == 2
    assert "label_smoothing (0.1) applies to loss cdpo only" in capsys.readouterr().err


def test_dpo_full_command(policy_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    status = main(["dpo", "--policy", str(policy_dir), "--out_dir", str(out), "--data.source", str(pairs_file),
                   "--train.lr", "1e-2", *SMALL])
    assert status == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "kl/chosen_per_token"):
        assert key in records[0]
    assert "val_rewards/accuracies" in records[-1]
    start, trained = load_model(policy_dir), load_model(out)
    unchanged = [name for name, p in trained.named_parameters()
                 if torch.equal(p, dict(start.named_parameters())[name])]
    assert unchanged == []
    assert json.loads((out / "model.json").read_text())["dpo"]["loss"] == "dpo"


def test_dpo_lora_command(policy_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo_lora"
    status = main(["dpo", "--policy", str(policy_dir), "--out_dir", str(out), "--data.source", str(pairs_file),
                   "--lora_r", "4", "--loss", "ipo", "--train.lr", "1e-2", *SMALL])
    assert status == 0
    _, adapters, _ = read_adapter(out / "adapter")
    assert len(adapters) == 2 * 7  # every projection of the 2 llama blocks
    assert any(lora.B.abs().sum() > 0 for lora in adapters.values())
    merged, start = load_model(out), load_model(policy_dir)
    assert not torch.equal(merged.blocks[0].attn.q_proj.weight, start.blocks[0].attn.q_proj.weight)


def test_resume_without_state_fails_before_data(policy_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["dpo", "--policy", str(policy_dir), "--out-dir", str(tmp_path / "dpo"), "--data.source", str(missing),
                 "--resume"]) == 2
    assert "no resume state" in capsys.readouterr().err
