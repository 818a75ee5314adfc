"""The report card of a run folder: `report.md`, built only from the files the stages wrote
(config.yaml, model.json, metrics.jsonl, summary.json, eval/results.json, replies), so
`gptlab report RUN_DIR` regenerates it at any time."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpt.config import option
from gpt.files import atomic_write_text

logger = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
# Metrics worth a column, per stage, when the stage logged them at an evaluation.
STAGE_METRICS = {
    "pretrain": ("val_loss", "val_bpb"),
    "sft": ("val_loss",),
    "reward": ("val_loss", "val_accuracy", "val_margin"),
    "dpo": ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_kl"),
    "ppo": ("objective/reward", "objective/kl", "task/accuracy"),
}


@dataclass
class ReportConfig:
    """Configuration of `gptlab report`."""

    run_dir: str = option("", "run folder to report on (the --out-dir of gptlab run or pretrain)")
    samples: int = option(4, "sample conversations to show, from the evaluation's saved replies")

    def problems(self) -> list[str]:
        return [] if self.run_dir else ["run_dir is required: the run folder to report on"]


def read_jsonl(path: Path) -> list[dict]:
    """Read the records of a JSON Lines file, stopping at the first line that is not valid JSON."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the last line of a killed run may be cut
    return records


def format_number(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if 1e3 <= abs(value) < 1e9:
            return f"{value:,.0f}"  # the same form as the integer columns beside it
        if value != 0 and (abs(value) >= 1e9 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def stage_row(run_dir: Path, stage: str) -> dict | None:
    """Numbers of one training stage from its metrics.jsonl, or None when it has none."""
    metrics_path = run_dir / stage / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    records = read_jsonl(metrics_path)
    if not records:
        return None
    last = records[-1]
    row = {"stage": stage, "steps": last.get("step", len(records)), "tokens": last.get("tokens_seen"),
           "wall": last.get("elapsed_s"), "loss": last.get("loss")}
    if row["wall"] and row["tokens"]:
        row["tok_per_s"] = row["tokens"] / row["wall"]
    for key in STAGE_METRICS.get(stage, ()):
        values = [r[key] for r in records if key in r]
        if values:
            row[key] = values[-1]
    return row


def model_summary(run_dir: Path) -> list[str]:
    model_json = run_dir / "pretrain" / "model.json"
    if not model_json.exists():
        return []
    model = json.loads(model_json.read_text(encoding="utf-8"))["model"]
    import torch  # noqa: F401  (the model class needs torch; imported here to keep `gptlab report --help` fast)

    from gpt.model import GPT, ModelConfig

    with torch.device("meta"):
        gpt = GPT(ModelConfig.from_dict(model))
    fields = ", ".join(f"{k} {model[k]}" for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size",
                                                  "vocab_size", "pos_encoding", "norm", "mlp"))
    return ["## Model", "", f"{gpt.num_parameters():,} parameters "
            f"({gpt.num_parameters(exclude_embeddings=True):,} without embeddings), "
            f"{gpt.flops_per_token():.3g} training FLOPs per token.", "", fields, ""]


def eval_table(run_dir: Path) -> list[str]:
    results_path = run_dir / "eval" / "results.json"
    if not results_path.exists():
        return []
    results = json.loads(results_path.read_text(encoding="utf-8"))
    rows = results.get("results", results) if isinstance(results, dict) else results
    lines = ["## Evaluation", "", "| task | metric | value | stderr | chance | n | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.get('task')} | {r.get('metric')} | {format_number(r.get('value'))} | "
                     f"{format_number(r.get('stderr')) if r.get('stderr') is not None else ''} | "
                     f"{format_number(r.get('chance')) if r.get('chance') is not None else ''} | "
                     f"{format_number(r.get('n', r.get('n_examples')))} | {format_number(r.get('seconds'))} |")
    return lines + [""]


def sample_conversations(run_dir: Path, count: int) -> list[str]:
    replies = sorted((run_dir / "eval").glob("*replies*.jsonl")) if (run_dir / "eval").exists() else []
    if not replies or count == 0:
        return []
    lines = ["## Sample conversations", ""]
    for record in read_jsonl(replies[0])[:count]:
        messages = record.get("messages") or []
        prompt = messages[-1]["content"] if messages else record.get("prompt") or record.get("instruction") or ""
        reply = record.get("reply") or record.get("output") or record.get("response") or ""
        lines += [f"**User:** {prompt.strip()}", "", f"**Assistant:** {reply.strip()}", ""]
    return lines


def build_report(run_dir: str | Path, samples: int = 4) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist; pass the --out-dir of a run")
    lines = [f"# Report: {run_dir.name}", ""]
    rows = [row for stage in TRAINING_STAGES if (row := stage_row(run_dir, stage))]
    if not rows:
        raise FileNotFoundError(f"no stage of {run_dir} has a metrics.jsonl yet; run a stage first")
    lines += ["## Stages", "", "| stage | steps | tokens seen | wall time | tokens/s | final train loss | validation |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        val = ", ".join(f"{k} {format_number(row[k])}" for k in STAGE_METRICS.get(row["stage"], ()) if k in row)
        wall = format_seconds(row["wall"]) if row.get("wall") else ""
        lines.append(f"| {row['stage']} | {format_number(row['steps'])} | {format_number(row.get('tokens'))} | "
                     f"{wall} | {format_number(row.get('tok_per_s', ''))} | {format_number(row.get('loss'))} | {val} |")
    lines.append("")
    lines += model_summary(run_dir)
    lines += eval_table(run_dir)
    curves = [stage for stage in TRAINING_STAGES if (run_dir / stage / "loss.png").exists()]
    if curves:
        lines += ["## Loss curves", ""] + [f"![{stage} loss]({stage}/loss.png)" for stage in curves] + [""]
    lines += sample_conversations(run_dir, samples)
    configs = [stage for stage in TRAINING_STAGES if (run_dir / stage / "config.yaml").exists()]
    if configs:
        lines += ["## Configuration", ""]
        for stage in configs:
            text = yaml.safe_dump(yaml.safe_load((run_dir / stage / "config.yaml").read_text(encoding="utf-8")),
                                  sort_keys=False)
            lines += [f"<details><summary>{stage}</summary>", "", "```yaml", text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def run(cfg: ReportConfig) -> Path:
    """Write RUN_DIR/report.md (the `report` stage)."""
    path = Path(cfg.run_dir) / "report.md"
    atomic_write_text(path, build_report(cfg.run_dir, cfg.samples))
    logger.info("wrote %s", path)
    return path
