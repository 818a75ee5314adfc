"""torchrun with two CPU processes (gloo) for the stages after pretraining.

SFT, the reward model and DPO must log what one process logs with the same global batch,
and a checkpoint written by two processes must resume in one. PPO and GRPO must keep the
two processes' weights and KL coefficients identical and leave a checkpoint that one
process resumes. Every torchrun run goes through LAUNCHER, which records for each rank
the files it writes in the run folder and a checksum of the weights after each optimizer
step. The tests therefore also check that rank 1 writes nothing and that DDP keeps the
replicas equal. The stages start from a tiny base pretrained on the real corpus, and
read real chat and preference data from GPTLAB_DATA_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.checkpoint import load_model
from gptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("GPTLAB_DATA_DIR"),
                                reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

LAUNCHER = '''\
"""Run `gptlab ARGS` in this process and write what it did to GPTLAB_TEST_REPORT/rankR.json."""
import hashlib
import json
import os
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from gptlab.cli import main
from rlhf.advantages import KLController

WATCH = os.path.abspath(os.environ["GPTLAB_TEST_WATCH"]) + os.sep
report = {"writes": [], "checksums": [], "kl_coefs": []}


def record_write(event, args):
    # Audit events name every file opened for writing, renamed or removed, also those that
    # safetensors writes, because gpt.files.atomic_write creates and renames them in Python.
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR))
        paths = [path] if writing else []
    elif event in ("os.rename", "os.remove"):
        paths = list(args[:2]) if event == "os.rename" else [args[0]]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(WATCH):
            report["writes"].append(f"{event} {os.fsdecode(path)}")


def record_checksum(optimizer, args, kwargs):
    digest = hashlib.sha256()
    for group in optimizer.param_groups:
        for p in group["params"]:
            digest.update(p.detach().cpu().numpy().tobytes())
    report["checksums"].append(digest.hexdigest())


update_coef = KLController.update


def record_kl_coef(self, kl, n_replies):
    update_coef(self, kl, n_replies)
    report["kl_coefs"].append(self.coef)


KLController.update = record_kl_coef
register_optimizer_step_post_hook(record_checksum)
sys.addaudithook(record_write)
status = main(sys.argv[1:])
with open(os.path.join(os.environ["GPTLAB_TEST_REPORT"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(report, f)
sys.exit(status)
'''

# float32, no dropout and a constant learning rate: a run's losses then do not depend on its
# max_steps, so a resumed run can be compared with an unbroken one.
COMMON = ["--train.batch_size", "2", "--train.grad_accum", "2", "--train.dtype", "float32", "--train.device", "cpu",
          "--train.schedule", "constant", "--train.warmup_steps", "0", "--train.lr", "1e-3",
          "--train.eval_interval", "2", "--train.eval_batches", "1", "--train.checkpoint_interval", "4",
          "--train.peak_tflops", "1"]
# eval_tokens 4: rank 0 alone also generates replies at each evaluation.
CHATS = ["--data", "identity,gpteacher", "--max_examples", "16", "--heldout_fraction", "0.25", "--eval_tokens", "4"]
PAIRS = ["--data.source", "hh-rlhf-harmless", "--data.max_pairs", "24", "--data.heldout_fraction", "0.25"]
LORA = ["--lora_r", "4", "--lora_dropout", "0"]  # LoRA dropout would draw other masks in each process
RUNS = {  # name: (stage, its settings)
    "sft": ("sft", CHATS),
    "reward": ("reward", PAIRS),
    "dpo": ("dpo", PAIRS),
    "sft-lora": ("sft", [*CHATS, *LORA]),
    "dpo-lora": ("dpo", [*PAIRS, *LORA]),
}
# Logged values that depend on the machine's speed, not on the computation.
TIMINGS = {"ms", "tok_per_s", "mfu", "eta_s", "elapsed_s"}


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """runs/NAME/pretrain of a 2-layer model (n_embd 32, block_size 64, no dropout), pretrained for 5 steps."""
    run = tmp_path_factory.mktemp("base")
    assert main(["pretrain", "--preset", "tiny", "--out-dir", str(run), "--data.vocab_size", "512",
                 "--model.block_size", "64", "--model.n_embd", "32", "--model.dropout", "0",
                 "--train.batch_size", "4", "--train.dtype", "float32", "--sample_tokens", "0",
                 "--train.max_steps", "5", "--train.eval_batches", "1", "--train.peak_tflops", "1"]) == 0
    return run / "pretrain"


@pytest.fixture(scope="session")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "launch.py"
    path.write_text(LAUNCHER)
    return path


def torchrun(launcher: Path, run: Path, *args: str) -> dict[int, dict]:
    """Run `gptlab ARGS` in two gloo processes, watching `run`; return each rank's report."""
    reports = run.parent / f"{run.name}-reports"
    reports.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPTLAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "GPTLAB_TEST_WATCH": str(run), "GPTLAB_TEST_REPORT": str(reports)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
               *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stage_args(run: str, base: Path, out: Path) -> list[str]:
    stage, settings = RUNS[run]
    start = "--policy" if stage == "dpo" else "--base"
    return [stage, start, str(base), "--out_dir", str(out), *settings, *COMMON]


@pytest.mark.parametrize("run", ["sft", "reward", "dpo", pytest.param("sft-lora", marks=pytest.mark.slow),
                                 pytest.param("dpo-lora", marks=pytest.mark.slow)])
def test_stage_matches_one_process(run, base, launcher, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*stage_args(run, base, single), "--train.max_steps", "6"]) == 0
    reports = torchrun(launcher, ddp, *stage_args(run, base, ddp), "--train.max_steps", "4")
    assert main([*stage_args(run, base, ddp), "--train.max_steps", "6", "--resume"]) == 0

    assert reports[1]["writes"] == []
    assert any(write.endswith("metrics.jsonl") for write in reports[0]["writes"])
    assert any(write.endswith("train_state.pt") for write in reports[0]["writes"])
    assert len(reports[0]["checksums"]) == 4
    assert reports[1]["checksums"] == reports[0]["checksums"]
    expected, found = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in found] == [1, 2, 3, 4, 5, 6]  # steps 1-4 from two processes, 5-6 resumed in one
    for e, f in zip(expected, found):
        assert set(f) == set(e), f"step {e['step']}"
        for key in ["loss", *sorted(set(e) - TIMINGS - {"loss"})]:
            assert f[key] == pytest.approx(e[key], abs=1e-5), f"step {e['step']}: {key}"


PPO = ["--task", "arithmetic", "--arithmetic.format_reward", "0.5", "--eval_prompts", "4", "--prompts_per_step", "4",
       "--group_size", "2", "--max_new_tokens", "6", "--temperature", "0.7", "--kl_target", "0.01",
       "--train.batch_size", "2", "--train.grad_accum", "2", "--train.lr", "1e-3", "--train.device", "cpu",
       "--train.checkpoint_interval", "2", "--train.eval_interval", "2"]


# PPO runs by default because it exercises more of the distributed code than GRPO: the value
# head's gradients, the whitening of advantages and the token count of each minibatch.
@pytest.mark.parametrize("algorithm", [pytest.param("grpo", marks=pytest.mark.slow), "ppo"])
def test_ppo_processes_stay_identical(algorithm, base, launcher, tmp_path):
    out = tmp_path / algorithm
    args = ["ppo", "--policy", str(base), "--algorithm", algorithm, "--out_dir", str(out), *PPO]
    reports = torchrun(launcher, out, *args, "--train.max_steps", "2")

    assert reports[1]["writes"] == []
    # GRPO: 8 replies, 4 on each process, in minibatches of 2 per process; PPO: 4 replies, 2 on each.
    # Two epochs of each of two rollouts.
    assert len(reports[0]["checksums"]) == (8 if algorithm == "grpo" else 4)
    assert reports[1]["checksums"] == reports[0]["checksums"]
    assert len(reports[0]["kl_coefs"]) == 2
    assert reports[1]["kl_coefs"] == reports[0]["kl_coefs"]
    assert reports[0]["kl_coefs"][-1] != 0.05  # kl_target adapted the default kl_coef
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]

    assert main([*args, "--train.max_steps", "3", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert load_model(out).config.n_embd == 32
