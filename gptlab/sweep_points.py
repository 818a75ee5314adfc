"""The points of a sweep, their folders, and the results table.

`expand_points` turns a sweep file (`gptlab.sweep.SweepConfig`) into its points: the
cartesian product of the `grid` lists, times the explicit `points`, times the `seeds`.
Each point runs in the folder OUT_DIR/NAME, where NAME is built from its overrides
(`block_size=64,pos_encoding=rope,seed=1`). The folder keeps the point's config file,
its output and a marker of how it ended.

`point_row` reads a point's folder into one row of the results table and `write_table`
writes OUT_DIR/results.csv and results.parquet. A row has the point's overrides and
seed, its status, and parameters and FLOPs per token (from model.json). Then come
tokens, wall time and tokens/s (from summary.json), and the final and best value of
every validation metric (from metrics.jsonl). A pretraining sweep adds the length
evaluation (`length_eval`), and an eval/results.json in the point's folder adds its
metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.report import read_jsonl

if TYPE_CHECKING:
    from gptlab.sweep import SweepConfig

POINT_FILE = "sweep_point.yaml"
DONE_FILE = "sweep_done.json"
FAILED_FILE = "sweep_failed.json"
LOG_FILE = "sweep.log"
LENGTH_FILE = "length_eval.json"
MAX_NAME_LENGTH = 100


@dataclass
class Point:
    """One run of the sweep."""

    name: str
    overrides: dict[str, Any]  # the swept values of this point, by dotted key
    seed: int | None
    folder: Path
    settings: dict[str, Any] = field(default_factory=dict)  # the point's config file: base, overrides, seed, paths


# ---------------------------------------------------------------------------
# Points and their names


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """Turn nested mappings into dotted keys: {model: {n_layer: 2}} -> {"model.n_layer": 2}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_value(value: Any) -> str:
    """Write a value as text for a folder name or a table cell."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def point_name(overrides: Mapping[str, Any], seed: int | None, seed_field: str) -> str:
    """Build a folder name from the overrides, such as "block_size=64,pos_encoding=rope,seed=1".

    Keys appear by their last dotted part unless two keys share it, sorted, with the seed
    last. Characters outside [A-Za-z0-9._+=,-] become "-", and a name over 100 characters
    is cut and ends in a hash of the whole name, so it stays unique.
    """
    tails = [key.rsplit(".", 1)[-1] for key in overrides]
    short = {key: tail if tails.count(tail) == 1 else key for key, tail in zip(overrides, tails)}
    parts = [f"{short[key]}={format_value(overrides[key])}" for key in sorted(overrides, key=lambda k: short[k])]
    if seed is not None:
        parts.append(f"{seed_field.rsplit('.', 1)[-1]}={seed}")
    name = re.sub(r"[^A-Za-z0-9._+=,-]", "-", ",".join(parts)) or "base"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LENGTH - 9]}-{digest}"
    return name


def expand_points(cfg: SweepConfig) -> list[Point]:
    """List every point: grid product x explicit points x seeds, in that nesting order.

    Raises:
        ValueError: two points get the same overrides (and so the same folder).
    """
    grid_keys = list(cfg.grid)
    grid_points = [dict(zip(grid_keys, values)) for values in itertools.product(*cfg.grid.values())]
    explicit = list(cfg.points) or [{}]
    seeds: list[int | None] = list(cfg.seeds) or [None]
    points, seen = [], {}
    for grid_point in grid_points:
        for extra in explicit:
            for seed in seeds:
                overrides = {**grid_point, **flatten(extra)}
                name = point_name(overrides, seed, cfg.seed_field)
                if name in seen:
                    raise ValueError(f"sweep points {seen[name]} and {overrides} both get the folder name {name!r}; "
                                     f"remove the duplicate from grid or points")
                seen[name] = overrides
                folder = Path(cfg.out_dir) / name
                # Later keys win when the stage reads the file, so a point's values override base.
                settings = {**cfg.base, **grid_point, **extra}
                if seed is not None:
                    settings[cfg.seed_field] = seed
                for key, template in cfg.point_paths.items():
                    settings[key] = template.replace("{point}", str(folder))
                points.append(Point(name, overrides, seed, folder, settings))
    return points


def swept_keys(cfg: SweepConfig) -> list[str]:
    """List the keys the sweep varies: the grid keys, then those of the explicit points."""
    keys = list(cfg.grid)
    for point in cfg.points:
        keys += [key for key in flatten(point) if key not in keys]
    return keys


# ---------------------------------------------------------------------------
# Point folders


def stage_dir(cfg: SweepConfig, point: Point) -> Path:
    """Find the folder the stage writes metrics.jsonl and summary.json to: POINT/STAGE when it
    exists (pretrain's layout), else a folder of point_paths that has them, else POINT."""
    candidates = [point.folder / cfg.stage]
    candidates += [Path(template.replace("{point}", str(point.folder))) for template in cfg.point_paths.values()]
    for folder in candidates:
        if (folder / "summary.json").exists() or (folder / "metrics.jsonl").exists():
            return folder
    return point.folder


def is_finished(cfg: SweepConfig, point: Point) -> bool:
    """Check whether the point ran to the end: a done marker, or the stage's summary.json."""
    return (point.folder / DONE_FILE).exists() or (stage_dir(cfg, point) / "summary.json").exists()


# ---------------------------------------------------------------------------
# Results


def model_numbers(folder: Path) -> dict[str, float]:
    """Count parameters and FLOPs per token of the model.json in `folder`; {} without one."""
    path = folder / "model.json"
    if not path.exists():
        return {}
    import torch

    from gpt.model import GPT, ModelConfig

    with torch.device("meta"):
        model = GPT(ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["model"]))
    return {"params": model.num_parameters(), "params_no_embedding": model.num_parameters(exclude_embeddings=True),
            "flops_per_token": model.flops_per_token()}


def metric_columns(records: list[dict]) -> dict[str, float]:
    """Take the final train loss, and the final and best value of every val_* metric in metrics.jsonl.

    "Best" is the minimum for losses and bits per byte and the maximum for anything else."""
    row: dict[str, float] = {}
    if records:
        row["final_loss"] = records[-1].get("loss")
    keys = sorted({key for r in records for key in r if key.startswith("val_")})
    for key in keys:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        row[f"final_{key}"] = values[-1]
        lower_is_better = "loss" in key or "bpb" in key
        row[f"best_{key}"] = min(values) if lower_is_better else max(values)
    return row


def eval_columns(path: Path) -> dict[str, float]:
    """Read an eval/results.json into one column per task and metric, named "eval/TASK/METRIC"."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.get("results", data) if isinstance(data, dict) else data
    columns = {}
    if isinstance(rows, list):
        for r in rows:
            if isinstance(r, dict) and "task" in r and isinstance(r.get("value"), (int, float)):
                columns[f"eval/{r['task']}/{r.get('metric', 'value')}"] = r["value"]
    elif isinstance(rows, dict):  # {task: {metric: value}}
        for task, metrics in rows.items():
            for metric, value in (metrics.items() if isinstance(metrics, dict) else [("value", metrics)]):
                if isinstance(value, (int, float)):
                    columns[f"eval/{task}/{metric}"] = value
    return columns


def point_row(cfg: SweepConfig, point: Point) -> dict[str, Any]:
    """Build the results row of one point from the files in its folder (see the module docstring)."""
    folder = stage_dir(cfg, point)
    status = "pending"
    if is_finished(cfg, point):
        status = "done"
    elif (point.folder / FAILED_FILE).exists():
        status = "failed"
    row: dict[str, Any] = {"name": point.name, "status": status, **point.overrides}
    if point.seed is not None:
        row[cfg.seed_field] = point.seed
    row["run_dir"] = str(folder)
    row.update(model_numbers(folder))

    summary_path = folder / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        for key in ("steps", "tokens_seen", "elapsed_s", "tok_per_s", "steady_step_ms", "peak_memory_gb"):
            if key in summary:
                row[key] = summary[key]
    if "flops_per_token" in row and "tokens_seen" in row:
        row["train_flops"] = row["flops_per_token"] * row["tokens_seen"]

    done_path = point.folder / DONE_FILE
    if done_path.exists():
        row["process_s"] = json.loads(done_path.read_text(encoding="utf-8")).get("process_s")

    if (folder / "metrics.jsonl").exists():
        row.update(metric_columns(read_jsonl(folder / "metrics.jsonl")))
    if (point.folder / LENGTH_FILE).exists():
        row.update(json.loads((point.folder / LENGTH_FILE).read_text(encoding="utf-8")))
    if (point.folder / "eval" / "results.json").exists():
        row.update(eval_columns(point.folder / "eval" / "results.json"))
    return row


def write_table(rows: list[dict], out_dir: Path) -> Any:
    """Write results.csv and results.parquet; return the pandas DataFrame.

    A column whose values mix types (for example numbers and None-like text) is stored as
    text, because a parquet column has one type."""
    import pandas as pd

    table = pd.DataFrame(rows)
    for column in table.columns:
        kinds = {type(v) for v in table[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1 and not kinds <= {int, float}:
            table[column] = table[column].map(lambda v: None if v is None else format_value(v))
        elif kinds and next(iter(kinds)) in (list, tuple, dict):
            table[column] = table[column].map(lambda v: None if v is None else format_value(v))
    table.to_csv(out_dir / "results.csv", index=False)
    table.to_parquet(out_dir / "results.parquet", index=False)
    return table
