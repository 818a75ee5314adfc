"""The `eval` stage: run evaluation tasks on a checkpoint and write results.json.

    gptlab eval --checkpoint runs/NAME/pretrain --tasks lm,arc_easy,blimp --limit 200
    gptlab eval --checkpoint runs/NAME/sft --tasks chat --reward runs/NAME/reward --compare runs/NAME/dpo

Every task adds rows (task, metric, value, stderr, n, seconds, and chance for
multiple-choice accuracies) to `results.json` in the output folder, beside the
checkpoint path and the resolved config. n counts examples, documents for lm, and
replies for chat tasks (an MT-Bench question has two). Generated replies go to
`replies.jsonl`.
Both files are rewritten after each task, so an interrupted run keeps the finished
tasks. The table printed at the end shows the same rows. See `evals/tasks.py` for the
tasks and `evals/scoring.py` for the scoring rules.

Multiple-choice metrics: acc picks the choice with the highest log-likelihood. acc_norm
divides each log-likelihood by the UTF-8 bytes of the choice text, without the space
that joins it to the question. lm-evaluation-harness 0.4 divides by characters instead,
which is the same number on ASCII text. acc_per_token divides by the number of tokens
of the continuation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evals import tasks as task_defs
from evals.scoring import encode_pair, predict_choices, score_continuations, token_nlls
from gpt.chat import render_prompt, stop_token_ids
from gpt.checkpoint import TOKENIZER_FILE, check_checkpoint_dir, load_model
from gpt.config import config_to_dict, option
from gpt.device import resolve_device, resolve_dtype
from gpt.files import atomic_write_text
from gpt.generate import SamplingParams, generate
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPLIES_FILE = "replies.jsonl"
# NOTE: evals.metrics imports `evaluate`, which imports transformers' pipelines (about 8 s on
# two CPU cores), so runners import it when they compute metrics, not when the CLI reads EvalConfig.
GSM8K_STOP = ["Question:", "\n\n"]  # the few-shot separators, as lm-evaluation-harness stops GSM8K
ARITHMETIC_MAX_NEW_TOKENS = 32


@dataclass
class EvalConfig:
    """Settings of `gptlab eval`."""

    checkpoint: Path = dataclasses.field(metadata={"help": "checkpoint folder to evaluate (model.safetensors, model.json, tokenizer.json), for example runs/NAME/sft"})
    tasks: list[str] = option(["lm"], f"tasks to run, comma-separated: {', '.join(task_defs.TASKS)}")
    limit: int | None = option(None, "maximum number of examples per task (documents for lm, prompts for chat tasks); none for all")
    out_dir: Path | None = option(None, "folder for results.json and replies.jsonl; none for eval/ beside the checkpoint folder (runs/NAME/eval)")
    num_fewshot: int | None = option(None, "solved examples in each prompt; none for each task's default (mmlu 5, gsm8k 5, the others 0)")
    batch_size: int = option(16, "sequences per forward pass when scoring, and prompts per batch when generating")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "device: auto picks cuda when available, then mps, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("float32", "autocast dtype of the forward passes; auto picks bfloat16 where the device computes it natively")
    seed: int = option(1234, "seed of the few-shot draws, of the arithmetic problems and of sampled replies")
    lm_source: str = option("tinystories-valid", "text of the lm task: a catalog name, a .txt/.jsonl file, or a token shard folder such as runs/NAME/data (its val split, held out from pretraining)")
    stride: int | None = option(None, "tokens between the starts of the lm task's sliding windows (1..block_size); none for block_size // 2")
    max_new_tokens: int = option(256, "maximum tokens generated per reply (gsm8k and chat tasks)")
    chat_template: bool = option(False, "render gsm8k prompts as a user message in the chat template, for chat models")
    chat_prompts: str = option("vicuna-bench", "prompts of the chat task: a catalog name (vicuna-bench, mt-bench, alpaca-eval) or a .jsonl file")
    temperature: float = option(0.0, "sampling temperature of chat replies; 0 is greedy")
    reward: Path | None = option(None, "reward model checkpoint folder that scores chat replies (runs/NAME/reward)")
    compare: Path | None = option(None, "second checkpoint for a head-to-head win rate on the chat tasks, judged by --reward")
    metrics: list[str] = option([], "extra evaluate metrics by Hub name (accuracy, f1, exact_match, ...), computed on each multiple-choice and gsm8k task's predictions; they need the Hub or a cached copy")
    sources: dict[str, str] = option({}, "data source per task, replacing its default, as YAML: '{hellaswag: val.jsonl, hellaswag_fewshot: train.jsonl, mmlu: cais/mmlu:test}'; TASK_fewshot sets where few-shot examples come from")

    def problems(self) -> list[str]:
        found = []
        unknown = [name for name in self.tasks if name not in task_defs.TASKS]
        if unknown or not self.tasks:
            found.append(f"tasks {unknown or self.tasks} are not known; choose from {', '.join(task_defs.TASKS)}")
        unknown_sources = [name for name in self.sources if name.removesuffix("_fewshot") not in task_defs.TASKS]
        if unknown_sources:
            found.append(f"sources has unknown keys {unknown_sources}; keys are task names, or a task name followed "
                         f"by _fewshot for the source of its few-shot examples")
        for name in ("limit", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                found.append(f"{name} must be at least 1 or none, got {value}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            found.append(f"num_fewshot must be 0 or more, or none for the task defaults, got {self.num_fewshot}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            found.append(f"temperature must be a finite number >= 0 (0 for greedy), got {self.temperature}")
        if self.compare is not None and self.reward is None:
            found.append("compare needs a reward model to judge the replies; pass --reward DIR as well")
        return found


@dataclass
class Evaluation:
    """State shared by the task runners: settings, model, tokenizer and the replies collected so far."""

    cfg: EvalConfig
    model: GPT
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    replies: list[dict] = dataclasses.field(default_factory=list)

    def source(self, spec: task_defs.TaskSpec) -> str:
        if spec.name == "chat":
            return self.cfg.sources.get("chat", self.cfg.chat_prompts)
        if spec.name == "lm":
            return self.cfg.sources.get("lm", self.cfg.lm_source)
        return self.cfg.sources.get(spec.name, spec.source)

    def fewshot_source(self, spec: task_defs.TaskSpec) -> str | None:
        return self.cfg.sources.get(f"{spec.name}_fewshot", spec.fewshot_source)

    def num_fewshot(self, spec: task_defs.TaskSpec) -> int:
        return spec.num_fewshot if self.cfg.num_fewshot is None else self.cfg.num_fewshot


def row(task: str, metric: str, value: float, n: int, stderr: float | None = None, **extra: Any) -> dict:
    """Build one results row. NaN and inf become None so that results.json stays valid JSON."""
    def clean(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

    return {"task": task, "metric": metric, "value": clean(float(value)), "stderr": clean(stderr), "n": n,
            **{key: clean(item) for key, item in extra.items()}}


def load_checkpoint(ckpt_dir: Path, device: torch.device) -> tuple[GPT, Tokenizer]:
    """Load a checkpoint's model (in eval mode) and tokenizer, checking that they belong together."""
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER_FILE)
    model = load_model(ckpt_dir, device=device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt_dir / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {model.config.vocab_size}; copy the tokenizer.json the model was trained with into "
                         f"{ckpt_dir}")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Language modelling


def run_perplexity(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import BitsPerByte

    source = ev.source(spec)
    stride = ev.cfg.stride or max(ev.model.config.block_size // 2, 1)
    if Path(source).is_dir() and (Path(source) / "meta.json").is_file():
        tokens, n_documents, n_bytes = task_defs.lm_shard_tokens(Path(source), ev.tokenizer, ev.cfg.limit)
    else:
        documents = task_defs.lm_documents(source, ev.cfg.limit)
        # Each document starts with <|endoftext|>, as in pretraining; the first one is never scored.
        encoded = ev.tokenizer.encode_batch(documents)
        tokens = np.concatenate([[ev.tokenizer.eot_id] + ids for ids in encoded])
        n_documents, n_bytes = len(documents), sum(len(doc.encode("utf-8")) for doc in documents)
    nlls = token_nlls(ev.model, tokens, stride=stride, batch_size=ev.cfg.batch_size, dtype=ev.dtype)
    result = BitsPerByte(keep_in_memory=True).compute(nll=[float(nlls.sum())], n_tokens=[len(nlls)],
                                                      n_bytes=[n_bytes])
    detail = {"tokens": len(nlls), "bytes": n_bytes, "stride": stride, "source": source}
    return [row(spec.name, name, result[name], n_documents, **detail)
            for name in ("loss", "perplexity", "bits_per_byte")]


# ---------------------------------------------------------------------------------------------
# Log-likelihood tasks


def _score_pairs(ev: Evaluation, pairs: list[tuple[str, str]]):
    encoded = [encode_pair(ev.tokenizer, context, continuation) for context, continuation in pairs]
    scores = score_continuations(ev.model, encoded, batch_size=ev.cfg.batch_size, dtype=ev.dtype,
                                 pad_id=ev.tokenizer.pad_id)
    truncated = sum(s.truncated for s in scores)
    if truncated:
        logger.warning("%d of %d scored sequences were longer than block_size %d and lost context from the left",
                       truncated, len(scores), ev.model.config.block_size)
    return scores


def _hub_metric_rows(ev: Evaluation, task: str, predictions: list, references: list) -> list[dict]:
    from evals.metrics import load_metric

    rows = []
    for name in ev.cfg.metrics:
        result = load_metric(name).compute(predictions=predictions, references=references)
        for key, value in result.items():
            if isinstance(value, (int, float)):
                rows.append(row(task, f"{name}/{key}", value, len(references)))
    return rows


def run_multiple_choice(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import Accuracy

    examples = task_defs.multiple_choice_examples(spec.name, ev.source(spec), ev.fewshot_source(spec),
                                                  ev.num_fewshot(spec), ev.cfg.limit, ev.cfg.seed)
    pairs = [(e.context, continuation) for e in examples for continuation in e.continuations()]
    predictions = predict_choices([e.choices for e in examples], _score_pairs(ev, pairs))
    gold = [e.gold for e in examples]
    chance = task_defs.random_chance(examples)
    # BLiMP compares whole sentences, so only the raw log-likelihood is its standard score.
    names = ["acc"] if spec.name == "blimp" else ["acc", "acc_norm", "acc_per_token"]
    rows = []
    for name in names:
        result = Accuracy(keep_in_memory=True).compute(predictions=predictions[name], references=gold)
        rows.append(row(spec.name, name, result["accuracy"], len(gold), result["stderr"], chance=chance))
    return rows + _hub_metric_rows(ev, spec.name, predictions["acc"], gold)


def run_last_word(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import Accuracy, mean_stderr

    pairs = task_defs.lambada_examples(ev.source(spec), ev.cfg.limit)
    scores = _score_pairs(ev, pairs)
    result = Accuracy(keep_in_memory=True).compute(predictions=[int(s.is_greedy) for s in scores],
                                                   references=[1] * len(scores))
    logprob, logprob_stderr = mean_stderr([s.logprob for s in scores])
    n = len(scores)
    # Perplexity over examples, exp(-mean log-likelihood of the word), as lm-evaluation-harness reports it.
    return [row(spec.name, "acc", result["accuracy"], n, result["stderr"]),
            row(spec.name, "perplexity", math.exp(-logprob) if -logprob < 700 else math.inf, n),
            row(spec.name, "logprob", logprob, n, logprob_stderr)]


# ---------------------------------------------------------------------------------------------
# Generation


def fit_prompt(ids: list[int], block_size: int, max_new_tokens: int) -> list[int]:
    """Drop tokens from the left of a prompt so that it leaves room to generate: at least
    max_new_tokens, or half the window when max_new_tokens would take more."""
    keep = max(block_size - max_new_tokens, block_size // 2)
    return ids[-keep:]


def generate_texts(ev: Evaluation, model: GPT, tokenizer: Tokenizer, prompts: list[list[int]],
                   params: SamplingParams):
    """Generate for every prompt in batches of batch_size; return the Completions in order."""
    block_size = model.config.block_size
    fitted = [fit_prompt(p, block_size, params.max_new_tokens) for p in prompts]
    cut = sum(len(a) != len(b) for a, b in zip(fitted, prompts))
    if cut:
        logger.warning("%d of %d prompts were cut from the left to leave room to generate within block_size %d",
                       cut, len(prompts), block_size)
    completions = []
    for start in range(0, len(fitted), ev.cfg.batch_size):
        completions += generate(model, fitted[start:start + ev.cfg.batch_size], params, tokenizer=tokenizer,
                                dtype=ev.dtype)
    return completions


def run_gsm8k(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import NumberExactMatch

    examples = task_defs.gsm8k_examples(ev.source(spec), ev.fewshot_source(spec), ev.num_fewshot(spec), ev.cfg.limit,
                                        ev.cfg.seed)
    tok = ev.tokenizer
    if ev.cfg.chat_template:
        prompts = [render_prompt(tok, [{"role": "user", "content": e.prompt}]) for e in examples]
        params = SamplingParams(max_new_tokens=ev.cfg.max_new_tokens, temperature=0.0,
                                stop_token_ids=stop_token_ids(tok))
    else:
        prompts = [[tok.eot_id] + tok.encode(e.prompt) for e in examples]
        params = SamplingParams(max_new_tokens=ev.cfg.max_new_tokens, temperature=0.0, stop=GSM8K_STOP,
                                stop_token_ids=[tok.eot_id])
    texts = [c.text for c in generate_texts(ev, ev.model, tok, prompts, params)]
    references = [e.reference for e in examples]
    for example, text in zip(examples, texts):
        ev.replies.append({"task": spec.name, "id": example.id, "prompt": example.prompt, "reply": text,
                           "reference": example.reference})
    rows = []
    for metric, strict in (("exact_match", False), ("exact_match_strict", True)):
        result = NumberExactMatch(keep_in_memory=True).compute(predictions=texts, references=references, strict=strict)
        rows.append(row(spec.name, metric, result["exact_match"], len(texts), result["stderr"]))
    return rows + _hub_metric_rows(ev, spec.name, texts, references)


def run_arithmetic(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import mean_stderr

    from gpt.tasks import ArithmeticConfig, ArithmeticTask

    task = ArithmeticTask(ArithmeticConfig())
    problems = task.heldout(ev.cfg.limit or 500, ev.cfg.seed)
    prompts = [render_prompt(ev.tokenizer, task.messages(p)) for p in problems]
    params = SamplingParams(max_new_tokens=ARITHMETIC_MAX_NEW_TOKENS, temperature=0.0,
                            stop_token_ids=stop_token_ids(ev.tokenizer))
    texts = [c.text for c in generate_texts(ev, ev.model, ev.tokenizer, prompts, params)]
    correct = [task.is_correct(p, text) for p, text in zip(problems, texts)]
    rewards = [task.reward(p, text) for p, text in zip(problems, texts)]
    for problem, text in zip(problems, texts):
        ev.replies.append({"task": spec.name, "prompt": problem.question, "reply": text, "reference": problem.answer})
    accuracy, accuracy_stderr = mean_stderr(correct)
    reward, reward_stderr = mean_stderr(rewards)
    return [row(spec.name, "accuracy", accuracy, len(problems), accuracy_stderr),
            row(spec.name, "reward", reward, len(problems), reward_stderr)]


# ---------------------------------------------------------------------------------------------
# Chat


def chat_replies(ev: Evaluation, model: GPT, tokenizer: Tokenizer,
                 prompts: list[task_defs.ChatPrompt]) -> list[dict]:
    """Reply to every turn of every prompt: turn k is sent with the model's own earlier replies.

    Returns:
        One record per reply, prompt by prompt and turn by turn: id, turn, category,
        messages (the prompt), reply, finish ("stop" or "length"), ended_by_end_of_turn
        and n_tokens (without the stop token).
    """
    params = SamplingParams(max_new_tokens=ev.cfg.max_new_tokens, temperature=ev.cfg.temperature,
                            stop_token_ids=stop_token_ids(tokenizer), seed=ev.cfg.seed)
    end_of_turn = tokenizer.special_id("<|end|>")
    histories = [[] for _ in prompts]
    records = []
    for turn in range(max(len(p.turns) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if turn < len(p.turns)]
        for i in active:
            histories[i].append({"role": "user", "content": prompts[i].turns[turn]})
        rendered = [render_prompt(tokenizer, histories[i]) for i in active]
        for i, completion in zip(active, generate_texts(ev, model, tokenizer, rendered, params)):
            stopped = completion.finish_reason == "stop"
            records.append({"prompt_index": i, "id": prompts[i].id, "turn": turn, "category": prompts[i].category,
                            "messages": list(histories[i]), "reply": completion.text,
                            "finish": completion.finish_reason,
                            "ended_by_end_of_turn": stopped and completion.tokens[-1] == end_of_turn,
                            "n_tokens": len(completion.tokens) - int(stopped)})
            histories[i].append({"role": "assistant", "content": completion.text})
    records.sort(key=lambda r: (r["prompt_index"], r["turn"]))
    for record in records:
        del record["prompt_index"]
    return records


def _reward_scores(ev: Evaluation, scorer, records: list[dict]) -> list[float]:
    conversations = [r["messages"] + [{"role": "assistant", "content": r["reply"]}] for r in records]
    return scorer(conversations)


def run_chat(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    from evals.metrics import mean_stderr

    prompts = task_defs.chat_prompts(ev.source(spec), ev.cfg.limit)
    records = chat_replies(ev, ev.model, ev.tokenizer, prompts)
    n = len(records)
    stop_rate, stop_stderr = mean_stderr([r["finish"] == "stop" for r in records])
    turn_rate, turn_stderr = mean_stderr([r["ended_by_end_of_turn"] for r in records])
    length, length_stderr = mean_stderr([r["n_tokens"] for r in records])
    rows = [row(spec.name, "stop_rate", stop_rate, n, stop_stderr),
            row(spec.name, "end_of_turn_rate", turn_rate, n, turn_stderr),
            row(spec.name, "reply_tokens", length, n, length_stderr)]

    if ev.cfg.reward is not None:
        from evals.scoring import load_reward_scorer

        scorer = load_reward_scorer(ev.cfg.reward, ev.device, ev.dtype, batch_size=ev.cfg.batch_size)
        rewards = _reward_scores(ev, scorer, records)
        for record, reward in zip(records, rewards):
            record["reward"] = reward
        reward_mean, reward_stderr = mean_stderr(rewards)
        rows.append(row(spec.name, "reward", reward_mean, n, reward_stderr))
        if ev.cfg.compare is not None:
            rows.append(_compare(ev, spec, prompts, records, scorer))
    for record in records:
        ev.replies.append({"task": spec.name, **record})
    return rows


def _compare(ev: Evaluation, spec: task_defs.TaskSpec, prompts, records: list[dict], scorer) -> dict:
    from evals.metrics import WinRate

    other_model, other_tokenizer = load_checkpoint(ev.cfg.compare, ev.device)
    other = chat_replies(ev, other_model, other_tokenizer, prompts)
    del other_model
    other_rewards = _reward_scores(ev, scorer, other)
    for record, opponent, reward in zip(records, other, other_rewards):
        assert (record["id"], record["turn"]) == (opponent["id"], opponent["turn"])
        record["compare_reply"], record["compare_reward"] = opponent["reply"], reward
    result = WinRate(keep_in_memory=True).compute(predictions=[r["reward"] for r in records],
                                                  references=other_rewards, seed=ev.cfg.seed)
    return row(spec.name, "win_rate", result["win_rate"], len(records), result["stderr"],
               ci_low=result["ci_low"], ci_high=result["ci_high"], wins=result["wins"], ties=result["ties"],
               losses=result["losses"], compare=str(ev.cfg.compare))


def run_generation(ev: Evaluation, spec: task_defs.TaskSpec) -> list[dict]:
    return run_arithmetic(ev, spec) if spec.name == "arithmetic" else run_gsm8k(ev, spec)


RUNNERS = {
    "perplexity": run_perplexity,
    "multiple_choice": run_multiple_choice,
    "last_word": run_last_word,
    "generate": run_generation,
    "chat": run_chat,
}


# ---------------------------------------------------------------------------------------------
# The stage


def format_table(rows: list[dict]) -> str:
    """Render rows as an aligned text table: task, metric, value, stderr, chance, n, seconds."""
    def number(x, digits=4):
        return "" if x is None else f"{x:.{digits}f}"

    header = ("task", "metric", "value", "± stderr", "chance", "n", "seconds")
    lines = [(r["task"], r["metric"], number(r["value"]), number(r.get("stderr")), number(r.get("chance")),
              str(r["n"]), number(r.get("seconds"), 1)) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells) -> str:
        # Task and metric names align left, numbers right.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def _write_outputs(out_dir: Path, results: dict, replies: list[dict]) -> None:
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if replies:
        atomic_write_text(out_dir / REPLIES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies))


def run(cfg: EvalConfig) -> dict:
    """Run `cfg.tasks` on the checkpoint, write results.json (and replies.jsonl) and print the table.

    Returns:
        The results: {"checkpoint", "config", "model", "results": [rows]}.

    Raises:
        FileNotFoundError: the checkpoint (or reward, compare) folder or one of its files is missing.
        ValueError: a data source is missing or malformed, or the tokenizer does not fit the model.
        NotImplementedError: the arithmetic task, until its generator is in gpt/.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_checkpoint(cfg.checkpoint, device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else Path(cfg.checkpoint).resolve().parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("evaluating %s (%.2fM parameters, block_size %d) on %s in %s: %s", cfg.checkpoint,
                model.num_parameters() / 1e6, model.config.block_size, device, str(dtype).removeprefix("torch."),
                ", ".join(cfg.tasks))
    ev = Evaluation(cfg, model, tokenizer, device, dtype)
    results = {"checkpoint": str(cfg.checkpoint), "config": config_to_dict(cfg),
               "model": model.config.to_dict(), "results": []}
    for name in cfg.tasks:
        spec = task_defs.TASKS[name]
        started = time.perf_counter()
        rows = RUNNERS[spec.kind](ev, spec)
        seconds = time.perf_counter() - started
        for task_row in rows:
            task_row["seconds"] = round(seconds, 3)
        results["results"] += rows
        _write_outputs(out_dir, results, ev.replies)
        logger.info("%s: %s in %.1f s", name, ", ".join(f"{r['metric']} {r['value']:.4g}" for r in rows
                                                         if r["value"] is not None), seconds)
    print(format_table(results["results"]))
    print(f"\nresults: {out_dir / RESULTS_FILE}" + (f"\nreplies: {out_dir / REPLIES_FILE}" if ev.replies else ""))
    return results
