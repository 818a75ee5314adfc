"""Pretraining end to end on the real corpus: the tiny preset, kill-and-resume equality,
and the errors a user meets first."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt.checkpoint import load_model
from gptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA_DIR, reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

# A small, fast variant of the tiny preset shared by the tests below.
SMALL = ["--data.vocab_size", "512", "--model.block_size", "64", "--model.n_embd", "32",
         "--train.batch_size", "4", "--train.dtype", "float32", "--sample_tokens", "0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run folder holding a trained tokenizer and token shards, copied by each test."""
    run = tmp_path_factory.mktemp("prepared")
    code = main(["pretrain", "--preset", "tiny", "--out-dir", str(run), *SMALL, "--train.max_steps", "1",
                 "--train.eval_batches", "1"])
    assert code == 0
    return run


def copy_prepared(prepared: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(prepared / "tokenizer.json", dest / "tokenizer.json")
    shutil.copytree(prepared / "data", dest / "data")
    return dest


def read_losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def pretrain_command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptlab", "pretrain", "--preset", "tiny", "--out-dir", str(run), *SMALL,
            "--train.max_steps", "24", "--train.checkpoint_interval", "4", "--train.eval_interval", "0",
            "--model.dropout", "0.1", *extra]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "GPTLAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_tiny_preset_end_to_end(prepared, tmp_path, capsys):
    run = copy_prepared(prepared, tmp_path / "run")
    assert main(["pretrain", "--preset", "tiny", "--out-dir", str(run), "--data.vocab_size", "512",
                 "--train.max_steps", "60", "--train.eval_interval", "30", "--sample_tokens", "0"]) == 0
    ckpt = run / "pretrain"
    for name in ("model.safetensors", "model.json", "tokenizer.json", "config.yaml", "metrics.jsonl",
                 "loss.png", "train_state.pt"):
        assert (ckpt / name).is_file(), name
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    assert list(records[0])[:6] == ["step", "loss", "lr", "gnorm", "ms", "tok_per_s"]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert "val_bpb" in records[29]
    assert 0 < records[-1]["val_bpb"] < 8

    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(ckpt), "--prompt", "Once upon a time", "--num_samples", "1",
                 "--max_new_tokens", "20"]) == 0
    printed = capsys.readouterr().out
    assert "Once upon a time" in printed
    assert sum(c.isalpha() for c in printed) > 30


def test_kill_and_resume_equal_losses(prepared, tmp_path):
    reference = copy_prepared(prepared, tmp_path / "reference")
    subprocess.run(pretrain_command(reference), env=subprocess_env(), check=True, capture_output=True)
    expected = read_losses(reference)
    assert len(expected) == 24

    run = copy_prepared(prepared, tmp_path / "killed")
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        extra = ["--resume"] if (run / "pretrain" / "train_state.pt").exists() else []
        process = subprocess.Popen(pretrain_command(run, *extra), env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for a checkpoint of this attempt, then kill at a random moment, possibly mid-save.
        deadline = time.time() + 60
        state = run / "pretrain" / "train_state.pt"
        start_mtime = state.stat().st_mtime if state.exists() else 0
        while time.time() < deadline and process.poll() is None:
            if state.exists() and state.stat().st_mtime > start_mtime:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1
    finish = subprocess.run(pretrain_command(run, "--resume"), env=subprocess_env(), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert read_losses(run) == expected
    load_model(run / "pretrain")  # the final checkpoint loads


def test_resume_with_other_block_size(prepared, tmp_path):
    run = copy_prepared(prepared, tmp_path / "run")
    assert main(["pretrain", "--preset", "tiny", "--out-dir", str(run), *SMALL, "--train.max_steps", "2"]) == 0
    code = main(["pretrain", "--preset", "tiny", "--out-dir", str(run), *SMALL, "--train.max_steps", "4",
                 "--model.block_size", "128", "--resume"])
    assert code == 2


def test_resume_block_size_message(prepared, tmp_path):
    from gpt.config import build_config
    from pretrain.train import PretrainConfig, train

    run = copy_prepared(prepared, tmp_path / "run")
    base = {"out_dir": str(run), "data.vocab_size": "512", "model.block_size": "64", "model.n_embd": "32",
            "train.batch_size": "4", "train.dtype": "float32", "sample_tokens": "0", "train.max_steps": "2"}
    from gptlab.presets import get_preset
    train(build_config(PretrainConfig, presets=[get_preset("pretrain", "tiny")], overrides=base))
    cfg = build_config(PretrainConfig, presets=[get_preset("pretrain", "tiny")],
                       overrides={**base, "model.block_size": "128", "train.resume": "true"})
    with pytest.raises(ValueError, match=r"model.block_size: saved 64, now 128"):
        train(cfg)


def test_corpus_smaller_than_batch(tmp_path):
    from gpt.config import build_config
    from pretrain.train import PretrainConfig, train

    corpus = tmp_path / "small.txt"
    corpus.write_text("One short story.\n\nAnd another one, also short.\n\nA third.\n", encoding="utf-8")
    cfg = build_config(PretrainConfig, overrides={
        "out_dir": str(tmp_path / "run"), "data.sources": str(corpus), "data.vocab_size": "300",
        "model.block_size": "64", "train.batch_size": "8", "sample_tokens": "0"})
    with pytest.raises(ValueError, match=r"fewer than one batch.*lower train.batch_size"):
        train(cfg)


def test_missing_corpus_exit_code(tmp_path, capsys):
    code = main(["pretrain", "--out-dir", str(tmp_path / "run"), "--data.sources", str(tmp_path / "nope.txt")])
    assert code == 2
    assert "nope.txt" in capsys.readouterr().err


def test_sample_missing_weights(prepared, tmp_path, capsys):
    run = copy_prepared(prepared, tmp_path / "run")
    shutil.copytree(prepared / "pretrain", run / "pretrain")
    (run / "pretrain" / "model.safetensors").unlink()
    assert main(["sample", "--checkpoint", str(run / "pretrain")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
