"""The shared training loop: accumulation by target count, schedules, decay groups."""

import json
import math

import pytest
import torch

from gpt.model import GPT, ModelConfig
from gpt.training import Hooks, TrainConfig, Trainer, build_optimizer, lr_at, plot_loss


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16))


def summed_loss(model, batch):
    x, y = batch
    out = model(x, y, loss_reduction="sum")
    return out.loss, int((y != -100).sum()), {}


class ListBatches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def ragged_batch(lengths: list[int], seed: int = 1):
    """Rows of different lengths, right-padded; padded targets are -100."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), 12, dtype=torch.long)
    y = torch.full((len(lengths), 12), -100)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, 64, (n + 1,), generator=generator)
        x[row, :n], y[row, :n] = tokens[:-1], tokens[1:]
    return x, y


def gradients_of_one_step(batches, grad_accum: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(batch_size=1, grad_accum=grad_accum, device="cpu", dtype="float32", grad_clip=0.0)
    trainer = Trainer(tiny_model(), cfg, "/tmp/unused", ListBatches(batches), Hooks(loss_fn=summed_loss))
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.train_step(iter(batches))
    return captured


def test_accumulation_equals_one_batch():
    x, y = ragged_batch([11, 3, 7, 1])
    whole = gradients_of_one_step([(x, y)], grad_accum=1)
    split = gradients_of_one_step([(x[:2], y[:2]), (x[2:], y[2:])], grad_accum=2)
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_mean_of_means_would_differ():
    # Guards the test above: with these lengths a mean of per-micro-batch means is a different gradient.
    x, y = ragged_batch([11, 3, 7, 1])
    model = tiny_model()
    model(x, y).loss.backward()
    whole = model.wte.weight.grad.clone()
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (model(x[part], y[part]).loss / 2).backward()
    assert not torch.allclose(model.wte.weight.grad, whole, atol=1e-6)


def test_no_targets_error():
    x, y = ragged_batch([3])
    y[:] = -100
    with pytest.raises(ValueError, match="no targets"):
        gradients_of_one_step([(x, y)], grad_accum=1)


def test_weight_decay_on_matrices_only():
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1
    assert plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_cosine_schedule_values():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0 / 110, 0, cfg) == pytest.approx(0.1)
    assert lr_at(9 / 110, 9, cfg) == pytest.approx(1.0)
    assert lr_at(10 / 110, 10, cfg) == pytest.approx(1.0)
    # Halfway through the decay the cosine is at the midpoint of lr and min_lr.
    assert lr_at(60 / 110, 60, cfg) == pytest.approx(0.55)
    assert lr_at(1.0, 110, cfg) == pytest.approx(0.1)


def test_wsd_schedule_values():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0.5, 50, cfg) == 1.0
    assert lr_at(0.8, 80, cfg) == 1.0
    assert lr_at(0.9, 90, cfg) == pytest.approx(0.5)
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.0)


def test_train_config_problems_listed():
    problems = TrainConfig(batch_size=0, lr=-1.0, beta2=1.5).problems()
    assert any("batch_size" in p for p in problems)
    assert any("train.lr" in p for p in problems)
    assert any("beta2" in p for p in problems)


def test_loop_overfits_one_batch(tmp_path):
    x, y = ragged_batch([11, 11, 11, 11], seed=3)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(batch_size=4, max_steps=40, lr=1e-2, warmup_steps=0, device="cpu", dtype="float32",
                      eval_interval=0, checkpoint_interval=1000)
    batches = ListBatches([(x, y)] * 40)
    trainer = Trainer(model, cfg, tmp_path, batches, Hooks(loss_fn=summed_loss))
    first = trainer.train_step(iter([(x, y)]))["loss"]
    trainer.step = 1
    summary = trainer.run()
    last = model(x, y).loss.item()
    assert math.isfinite(last)
    assert last < 0.5 * first
    assert summary["steps"] == 40
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    assert (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "train_state.pt").exists()


def test_plot_loss_adds_a_panel_per_logged_metric(tmp_path):
    from PIL import Image

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 0.69, "accuracy": 0.5},
        {"step": 2, "loss": 0.60, "accuracy": 0.75, "val_loss": 0.65, "val_accuracy": 0.6},
    ]))
    plot_loss(metrics, tmp_path / "loss_only.png")
    plot_loss(metrics, tmp_path / "with_accuracy.png", extra=("accuracy", "not_logged"))
    loss_only = Image.open(tmp_path / "loss_only.png").size
    with_accuracy = Image.open(tmp_path / "with_accuracy.png").size
    # One 4-inch panel more at 120 dpi: "accuracy" is drawn and "not_logged" left out.
    assert with_accuracy == (loss_only[0] + 4 * 120, loss_only[1])
