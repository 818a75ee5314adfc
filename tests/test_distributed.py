"""torchrun with two CPU processes (gloo): the same losses as one process with the same
global batch, and checkpoints that resume with a different number of processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("GPTLAB_DATA_DIR"),
                                reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

# float32, no dropout and a constant learning rate: a run's losses then do not depend on its
# max_steps, so a resumed run can be compared with an unbroken one.
SETTINGS = ["--preset", "tiny", "--data.vocab_size", "512", "--model.block_size", "64", "--model.n_embd", "32",
            "--train.batch_size", "2", "--train.grad_accum", "2", "--train.dtype", "float32",
            "--train.schedule", "constant", "--train.warmup_steps", "0", "--train.eval_interval", "0",
            "--train.checkpoint_interval", "4", "--sample_tokens", "0"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "GPTLAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def single(run: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "gptlab", "pretrain", "--out-dir", str(run), *SETTINGS, *extra]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def torchrun(run: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gptlab", "pretrain", "--out-dir", str(run), *SETTINGS, *extra]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("prepared")
    assert main(["pretrain", "--out-dir", str(run), *SETTINGS, "--train.max_steps", "1"]) == 0
    return run


def copy_prepared(prepared: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    shutil.copy(prepared / "tokenizer.json", dest / "tokenizer.json")
    shutil.copytree(prepared / "data", dest / "data")
    return dest


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> list[tuple[int, float]]:
    """Eight steps in one process."""
    run = copy_prepared(prepared, tmp_path_factory.mktemp("one") / "run")
    single(run, "--train.max_steps", "8")
    return losses(run)


def assert_close_losses(actual, expected, tol=1e-5):
    assert [step for step, _ in actual] == [step for step, _ in expected]
    for (step, a), (_, e) in zip(actual, expected):
        assert abs(a - e) <= tol, f"step {step}: {a} != {e}"


@pytest.mark.slow
def test_two_processes_match_one(prepared, reference, tmp_path):
    run = copy_prepared(prepared, tmp_path / "ddp")
    torchrun(run, "--train.max_steps", "8")
    assert_close_losses(losses(run), reference)


def test_two_process_checkpoint_resumes_in_one(prepared, reference, tmp_path):
    run = copy_prepared(prepared, tmp_path / "ddp")
    torchrun(run, "--train.max_steps", "4")
    single(run, "--train.max_steps", "8", "--resume")
    assert_close_losses(losses(run), reference)


@pytest.mark.slow
def test_sharded_matches_one(prepared, reference, tmp_path):
    run = copy_prepared(prepared, tmp_path / "fsdp")
    torchrun(run, "--train.max_steps", "4", "--train.fsdp")
    single(run, "--train.max_steps", "8", "--resume")
    assert_close_losses(losses(run), reference)
    assert (run / "pretrain" / "model.safetensors").is_file()


def test_grad_accum_must_divide(prepared, tmp_path):
    run = copy_prepared(prepared, tmp_path / "odd")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gptlab", "pretrain", "--out-dir", str(run), *SETTINGS, "--train.max_steps", "2",
               "--train.grad_accum", "3"]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "must be a multiple of the number of processes (2)" in result.stderr
