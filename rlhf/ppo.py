"""Reinforcement learning from a reward (`gptlab ppo`): PPO with a value head, or GRPO.

    gptlab ppo --policy runs/NAME/sft --reward runs/NAME/reward      # -> runs/NAME/ppo
    gptlab ppo --policy runs/NAME/sft --task arithmetic --algorithm grpo

Each step samples replies to a batch of prompts with the shared generation engine
(`gpt.generate`), by pure sampling at `temperature` (no top-k, top-p or repetition
penalty), so the sampling distribution is softmax(logits / temperature). The
log-probabilities used in training are recomputed with one forward pass at that
temperature, and a test checks that they equal the sampler's. A reply is scored once
at its end: by the reward model (`rlhf.reward`), on the conversation as the chat
template renders it, or by the rule of a built-in task (`gpt.tasks`). The
reference is the frozen starting policy; with LoRA it is the policy with its adapters
disabled, so no second copy is kept.

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, with the
per-token KL penalty of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"): the reward of reply token t is -kl_coef * (log pi(y_t) - log
pi_ref(y_t)), plus the score on the last token. Advantages come from GAE (Schulman et
al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16) over the reply tokens only: the end of a reply is terminal, and
padding after it gets no advantage and no value loss. The value head is
nn.Linear(n_embd, 1) on the policy's final hidden states, so policy and critic share
the trunk and the value loss (weighted by vf_coef) also trains it. Value predictions
are clipped around the rollout's values, as OpenAI baselines' ppo2 does. kl_coef is
fixed, or adapted toward kl_target by Ziegler et al.'s proportional controller.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples group_size replies
per prompt and gives every token of a reply the advantage (r - mean of the group) /
(std of the group + eps). It has no value head. Its loss is the same clipped objective
plus kl_coef times the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1, averaged over each
reply's tokens and then over replies, as the paper's objective does. PPO's loss
averages over all tokens of the minibatch.

A step is one rollout followed by ppo_epochs passes over it in minibatches of
train.batch_size * train.grad_accum replies, one optimizer step per minibatch. The
loop is its own, built from gpt.training's optimizer, schedule and duration helpers,
because the shared Trainer takes one loss per micro-batch from a fixed data stream.
The rollouts and the update are in `rlhf.rollout`, the advantages and per-token losses
in `rlhf.advantages`; this module holds the config, evaluation, checkpoints and the loop.

Under torchrun each process samples its share of the step's prompts_per_step prompts
with a seed of its own, and train.grad_accum is divided among the processes, so a
minibatch keeps train.batch_size * train.grad_accum replies over all of them. The
update synchronizes gradients through DistributedDataParallel; generation calls the
unwrapped policy. Rank 0 alone evaluates, logs and writes files. The rollout
statistics, the KL controller's input among them, are means over every process, so
all processes keep the same kl_coef.

The output folder is a checkpoint (model.safetensors, model.json, tokenizer.json,
config.yaml) with value_head.safetensors (PPO), adapter/ (LoRA), metrics.jsonl,
reward.png, summary.json and train_state.pt for --train.resume.

Limits: dropout is off in every forward pass, because the probability ratio must
compare one deterministic function before and after updates. No FSDP and no
torch.compile. Under torchrun each process holds the whole reference and reward
model, and the held-out evaluation runs on rank 0 while the others wait.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from gpt import distributed
from gpt.chat import stop_token_ids
from gpt.checkpoint import (TOKENIZER_FILE, check_checkpoint_dir, load_model, load_train_state, require_resume_state,
                            save_model, save_train_state)
from gpt.config import option, save_config
from gpt.device import resolve_device, resolve_dtype
from gpt.files import atomic_write
from gpt.generate import SamplingParams, generate
from gpt.lora import add_lora, merge_adapter, save_adapter
from gpt.tasks import TASKS, ArithmeticConfig, evaluate_accuracy
from gpt.tokenizer import Tokenizer
from gpt.training import TrainConfig, build_optimizer, format_duration, lr_at
from rlhf.advantages import KLController
from rlhf.reward import load_reward_model
from rlhf.rollout import (
    DataPrompts,
    PolicyWithValueHead,
    Prompt,
    Scorer,
    TaskPrompts,
    collect_rollout,
    reward_model_scorer,
    task_scorer,
    update,
)

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"
# Process r samples its replies with the step's seed + r * RANK_SEED_STRIDE, so that the
# processes draw different random numbers. The stride keeps them apart from the seeds of later steps.
RANK_SEED_STRIDE = 1_000_003


def ppo_train_defaults() -> TrainConfig:
    # Steps are rollouts. A low constant rate and no weight decay keep the policy near its
    # start; float32 because ratios and KL terms are small differences of log-probabilities.
    return TrainConfig(batch_size=16, max_steps=200, lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                       dtype="float32", eval_interval=25, checkpoint_interval=50)


@dataclass
class PPOConfig:
    """Configuration of `gptlab ppo`."""

    policy: str = option("", "checkpoint folder of the chat model to train, for example runs/NAME/sft")
    reward: str = option("", "checkpoint folder of the reward model (gptlab reward); leave empty when task is set")
    task: str = option("", f"built-in task with a rule-based reward, used instead of a reward model: {', '.join(TASKS)}")
    out_dir: str = option("", "folder to write the trained policy to; empty for the folder ppo (or grpo) beside policy")
    algorithm: Literal["ppo", "grpo"] = option("ppo", "ppo (value head, GAE) or grpo (group-relative advantages, no value head)")
    prompts: str = option("gpteacher", "reward-model runs: chat data whose conversations, without their last reply, are the prompts (a source or mix as gptlab sft takes)")
    max_prompts: int = option(0, "reward-model runs: read at most this many conversations per source; 0 reads all")
    eval_prompts: int = option(200, "held-out prompts (task problems) answered greedily at each evaluation; a task with fewer held-out problems uses all of them")
    prompts_per_step: int = option(64, "prompts sampled for each rollout")
    group_size: int = option(8, "grpo: replies sampled per prompt (at least 2); ppo samples one")
    max_new_tokens: int = option(32, "maximum tokens per reply")
    temperature: float = option(1.0, "sampling temperature of the rollouts; log-probabilities are taken at the same temperature")
    ppo_epochs: int = option(2, "passes over each rollout")
    clip_eps: float = option(0.2, "clip range of the probability ratio")
    value_clip: float = option(0.2, "ppo: clip range of the value predictions around the rollout's values")
    vf_coef: float = option(0.1, "ppo: weight of the value loss")
    gamma: float = option(1.0, "ppo: discount per reply token")
    lam: float = option(0.95, "ppo: GAE lambda")
    whiten_advantages: bool = option(True, "ppo: normalize the rollout's advantages to mean 0 and std 1 over its reply tokens")
    kl_coef: float = option(0.05, "beta: weight of the KL to the reference (a per-token reward penalty in ppo, a loss term in grpo)")
    kl_target: float = option(0.0, "target KL per reply in nats for the adaptive coefficient (Ziegler et al. 2019); 0 keeps kl_coef fixed")
    kl_horizon: int = option(10000, "adaptive KL: horizon in replies; larger values adapt kl_coef more slowly")
    unfinished_penalty: float = option(0.0, "subtracted from the score of a reply that reached max_new_tokens without a stop token")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight")
    lora_alpha: float = option(16.0, "LoRA alpha: the adapters' updates are scaled by lora_alpha / lora_r")
    lora_targets: str = option("all", "projections that get LoRA adapters, as gptlab sft takes them")
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig, metadata={"help": "the arithmetic task (task=arithmetic)"})
    train: TrainConfig = field(default_factory=ppo_train_defaults, metadata={"help": "optimization; a step is one rollout, and an optimizer step takes a minibatch of batch_size * grad_accum replies"})

    def problems(self) -> list[str]:
        found = []
        if not self.policy:
            found.append("policy is empty; pass the checkpoint folder to train, for example --policy runs/NAME/sft")
        if bool(self.reward) == bool(self.task):
            found.append(f"set exactly one of reward (a reward model folder) and task ({', '.join(TASKS)}); "
                         f"got reward={self.reward!r} and task={self.task!r}")
        if self.task and self.task not in TASKS:
            found.append(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("prompts_per_step", "max_new_tokens", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_prompts", "eval_prompts", "kl_coef", "kl_target", "lora_r", "unfinished_penalty"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.algorithm == "grpo" and self.group_size < 2:
            found.append(f"group_size must be at least 2 for grpo, whose advantages compare replies to one prompt; got {self.group_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            found.append(f"temperature must be a finite number > 0 (rollouts sample), got {self.temperature}")
        for name in ("clip_eps", "value_clip"):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lora_r and self.lora_alpha <= 0:
            found.append(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.train.fsdp or self.train.compile:
            found.append("train.fsdp and train.compile are not supported by ppo; set them to false")
        return found

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size if self.algorithm == "grpo" else 1


# ---------------------------------------------------------------------------
# Rewards and evaluation


def build_reward(cfg: PPOConfig, tokenizer: Tokenizer, max_prompt_tokens: int, device: torch.device):
    """Return (task or None, prompt source, scorer) for a task run or a reward-model run."""
    if cfg.task:
        task = TASKS[cfg.task](cfg.arithmetic)
        return task, TaskPrompts(task, tokenizer, cfg.eval_prompts, cfg.train.seed, max_prompt_tokens), task_scorer(task)
    reward_model = load_reward_model(cfg.reward, device)
    if reward_model.tokenizer is not None and reward_model.tokenizer.fingerprint != tokenizer.fingerprint:
        raise ValueError(f"the reward model {cfg.reward} was trained with another tokenizer than the policy "
                         f"{cfg.policy}; train the reward model from the policy's run (gptlab reward --base ...)")
    return None, DataPrompts(cfg, tokenizer, max_prompt_tokens), reward_model_scorer(reward_model, tokenizer)


@torch.no_grad()
def evaluate(model: PolicyWithValueHead, tokenizer: Tokenizer, task, heldout: list[Prompt], scorer: Scorer,
             cfg: PPOConfig, dtype: torch.dtype, batch_size: int = 64) -> dict[str, float]:
    """Greedy replies to the held-out prompts: task/accuracy and task/reward for a task,
    eval/reward (the reward model's mean score) otherwise."""
    if not heldout:
        return {}
    model.eval()
    if task is not None:
        return evaluate_accuracy(model.gpt, tokenizer, task, [p.problem for p in heldout], cfg.max_new_tokens,
                                 batch_size, dtype)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    completions = []
    for start in range(0, len(heldout), batch_size):
        chunk = [p.ids for p in heldout[start:start + batch_size]]
        completions += generate(model.gpt, chunk, params, tokenizer=tokenizer, dtype=dtype)
    return {"eval/reward": scorer(heldout, completions).mean().item()}


# ---------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(model: PolicyWithValueHead, out_dir: Path, policy_dir: Path, step: int, state: dict) -> None:
    """Write the policy (LoRA merged, adapter beside it), the value head and the resume state."""
    policy = model.policy
    meta = {"stage": "ppo", "policy": str(policy_dir)}
    if policy is not model.gpt:  # a PeftModel
        save_adapter(policy, out_dir / ADAPTER_DIR, policy_dir)
        meta["adapter"] = ADAPTER_DIR
        policy = merge_adapter(copy.deepcopy(policy))
    save_model(policy, out_dir, tokenizer_file=policy_dir / TOKENIZER_FILE, step=step, extra={"ppo": meta})
    if model.value_head is not None:
        head = {name: t.detach().cpu().contiguous() for name, t in model.value_head.state_dict().items()}
        atomic_write(out_dir / VALUE_HEAD_FILE, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    save_train_state(out_dir, state)


LOG_FIELDS = [("objective/reward", "reward", ".3f"), ("objective/kl", "kl", ".4f"), ("policy/clipfrac", "clipfrac", ".3f"),
              ("policy/approxkl", "approxkl", ".2e"), ("loss/value", "vloss", ".4f"), ("policy/entropy", "entropy", ".3f"),
              ("reply/length", "len", ".1f"), ("task/accuracy", "accuracy", ".3f"), ("eval/reward", "eval reward", ".3f")]


def log_line(record: dict, max_steps: int) -> str:
    parts = [f"step {record['step']}/{max_steps}"]
    parts += [f"{label} {record[key]:{spec}}" for key, label, spec in LOG_FIELDS if key in record]
    parts += [f"lr {record['lr']:.2e}", f"{record['ms']:.0f} ms", f"eta {format_duration(record['eta_s'])}"]
    return " | ".join(parts)


def plot_rewards(metrics_path: Path, out_path: Path, title: str) -> None:
    """Draw the rollouts' mean score per step, and the evaluation metric where evaluated, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r for r in records if "objective/reward" in r]
    ax.plot([r["step"] for r in steps], [r["objective/reward"] for r in steps], label="rollout reward", linewidth=1)
    for key in ("task/accuracy", "eval/reward"):
        evals = [r for r in records if key in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=f"held-out {key}")
    ax.set_xlabel("step (rollout)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def evaluation_before(metrics_path: Path) -> dict[str, float]:
    """Return the evaluation a resumed run did before its first step: the step-0 record of metrics.jsonl."""
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("step") == 0:
            return {key: value for key, value in record.items() if key != "step"}
    return {}


# ---------------------------------------------------------------------------
# The stage


def check_world_size(cfg: PPOConfig, world_size: int) -> None:
    """Raise ValueError when the step's prompts or minibatches do not divide among `world_size` processes."""
    problems = []
    if cfg.prompts_per_step % world_size:
        problems.append(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of processes "
                        f"({world_size}), so that each samples the same number of prompts; set prompts_per_step to "
                        f"a multiple of {world_size}")
    if cfg.train.grad_accum % world_size:
        problems.append(f"train.grad_accum ({cfg.train.grad_accum}) must be a multiple of the number of processes "
                        f"({world_size}), so that a minibatch stays train.batch_size * train.grad_accum replies; set "
                        f"train.grad_accum to a multiple of {world_size}")
    if problems:
        raise ValueError("invalid ppo config for torchrun:\n  " + "\n  ".join(problems))


def train(cfg: PPOConfig) -> dict:
    """Train the policy of `cfg.policy` with PPO or GRPO and write the checkpoint; return a summary
    with the evaluation before and after (empty on every process but rank 0).

    Raises:
        ValueError: an invalid config, prompts that leave no room to reply, a reward model with
            another tokenizer, an out_dir that is the policy folder, or under torchrun
            prompts_per_step or train.grad_accum not a multiple of the number of processes.
        FileNotFoundError: a checkpoint folder or one of its files is missing.
    """
    problems = cfg.problems()  # build_config checks these too, but train() may be called directly
    if problems:
        raise ValueError("invalid ppo config:\n  " + "\n  ".join(problems))
    distributed.setup(cfg.train.device)
    world_size, rank, is_main = distributed.world_size(), distributed.rank(), distributed.is_main()
    check_world_size(cfg, world_size)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", distributed.local_rank())
    dtype = resolve_dtype(cfg.train.dtype, device)
    policy_dir = check_checkpoint_dir(cfg.policy)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else policy_dir.parent / cfg.algorithm
    if out_dir.resolve() == policy_dir.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the policy's checkpoint folder, which training would "
                         f"overwrite; set out_dir to another folder")
    if cfg.train.resume:
        require_resume_state(out_dir)
    tokenizer = Tokenizer.from_file(policy_dir / TOKENIZER_FILE)
    policy = load_model(policy_dir)
    max_prompt_tokens = policy.config.block_size - cfg.max_new_tokens
    if max_prompt_tokens < 2:
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in block_size "
                         f"{policy.config.block_size}; lower max_new_tokens")
    reference = None
    if cfg.lora_r:
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval().to(device)
    model = PolicyWithValueHead(policy, value_head=cfg.algorithm == "ppo").to(device)
    task, prompts, scorer = build_reward(cfg, tokenizer, max_prompt_tokens, device)
    optimizer = build_optimizer(model, cfg.train, device)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    vocab_limit = min(model.gpt.config.vocab_size, tokenizer.vocab_size)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    local_prompts = cfg.prompts_per_step // world_size
    logger.info("%s: %s trainable parameters (%s); %d prompts x %d replies per step%s, %d epochs in minibatches of %d",
                cfg.algorithm, f"{n_trainable:,}", f"LoRA r={cfg.lora_r}" if cfg.lora_r else "full",
                cfg.prompts_per_step, cfg.samples_per_prompt,
                f" ({local_prompts} prompts on each of {world_size} processes)" if world_size > 1 else "",
                cfg.ppo_epochs, cfg.train.batch_size * cfg.train.grad_accum)

    metrics_path = out_dir / "metrics.jsonl"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    step, elapsed = 0, 0.0
    if cfg.train.resume:
        from gpt.training import _truncate_metrics

        state = load_train_state(out_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        kl.coef, step, elapsed = state["kl_coef"], state["step"], state["elapsed"]
        torch.set_rng_state(state["rng_cpu"])
        if is_main:
            _truncate_metrics(metrics_path, step)
        logger.info("resumed at step %d from %s", step, out_dir)
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    # Generation and the rollout's forward passes call `model`; only the update runs through
    # the wrapper, whose forward prepares the gradient all-reduce of the backward pass.
    forward_model = model
    if world_size > 1:
        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run_eval() -> dict[str, float]:
        if not is_main:
            return {}
        return evaluate(model, tokenizer, task, prompts.heldout, scorer, cfg, dtype)

    def done() -> bool:
        return step >= cfg.train.max_steps or (cfg.train.max_time > 0 and elapsed >= cfg.train.max_time)

    if step == 0:
        before = run_eval()
    else:
        before = evaluation_before(metrics_path) if is_main else {}
    step_times: list[float] = []
    last_eval = before
    with open(metrics_path, "a", encoding="utf-8") if is_main else contextlib.nullcontext() as metrics_file:
        if before and step == 0:
            logger.info("before training: %s", json.dumps(before))
            metrics_file.write(json.dumps({"step": 0, **before}) + "\n")
        while not done():
            t0 = time.perf_counter()
            progress = step / cfg.train.max_steps
            if cfg.train.max_time > 0:
                progress = max(progress, elapsed / cfg.train.max_time)
            lr = lr_at(progress, step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed = cfg.train.seed * 100_003 + step
            # Every process draws the step's prompts alike and keeps its own slice of them.
            share = prompts.sample(cfg.prompts_per_step, seed)[rank * local_prompts:(rank + 1) * local_prompts]
            rollout = collect_rollout(model, reference, tokenizer, share, scorer, kl.coef, cfg,
                                      seed + rank * RANK_SEED_STRIDE, dtype)
            stats = update(forward_model, optimizer, rollout, cfg, vocab_limit, torch.Generator().manual_seed(seed),
                           dtype)
            kl.update(rollout.stats["objective/kl"], cfg.prompts_per_step * cfg.samples_per_prompt)
            dt = time.perf_counter() - t0
            # Every process follows rank 0's clock, so all agree on when max_time ends the run.
            elapsed = distributed.broadcast_float(elapsed + dt, device)
            step += 1
            step_times.append(dt)
            eta = (cfg.train.max_steps - step) * elapsed / step
            record = {"step": step, **rollout.stats, **stats, "lr": lr, "ms": 1000 * dt, "elapsed_s": elapsed,
                      "eta_s": eta}
            evaluated = done() or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0)
            if evaluated:
                last_eval = run_eval()
                record.update(last_eval)
            if is_main and (step % cfg.train.log_interval == 0 or evaluated):
                logger.info(log_line(record, cfg.train.max_steps))
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if step % cfg.train.checkpoint_interval == 0 or done():
                if is_main:
                    state = {"step": step, "elapsed": elapsed, "kl_coef": kl.coef, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
                    save_checkpoint(model, out_dir, policy_dir, step, state)
                distributed.barrier()

    steady = step_times[min(len(step_times) // 5, 10):] or step_times or [0.0]
    summary = {"steps": step, "elapsed_s": elapsed, "steady_step_ms": 1000 * sum(steady) / len(steady),
               "before": before, "after": last_eval}
    if is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot_rewards(metrics_path, out_dir / "reward.png", f"{cfg.algorithm} {out_dir.parent.name}")
        logger.info("done: %d steps in %s | before %s | after %s | checkpoint %s", step, format_duration(elapsed),
                    json.dumps(before), json.dumps(last_eval), out_dir)
    return summary
