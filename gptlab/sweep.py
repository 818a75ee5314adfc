"""Sweeps: run one stage at every point of a grid of config overrides, each point in its own
process and run folder, and collect one results table.

    gptlab sweep --config SWEEP.yaml

A sweep file names the stage, its presets, the `base` overrides every point shares, and
the points: the cartesian product of the `grid` lists, times the explicit `points` (dicts
of overrides), times the `seeds`. Keys are the stage's dotted field names:

    stage: pretrain
    presets: [tiny]
    out_dir: runs/sweep-positions
    base: {train.max_steps: 300}
    grid: {model.pos_encoding: [learned, rope, alibi, none]}
    points: [{model.block_size: 64, train.batch_size: 32}, {model.block_size: 128, train.batch_size: 16}]
    seeds: [1, 2]

Each point runs as `python -m gptlab STAGE --preset P --config OUT_DIR/NAME/sweep_point.yaml`
in the folder OUT_DIR/NAME, where NAME is built from its overrides
(`block_size=64,pos_encoding=rope,seed=1`), and its output goes to NAME/sweep.log. Every
point's config is checked before anything runs. A point that exits with status 0 gets a
`sweep_done.json` marker. When the sweep runs again, it skips every finished point (one
with the marker or with the stage's summary.json), so an interrupted sweep resumes where
it stopped. A point that failed or was interrupted runs again from the start.

The table OUT_DIR/results.csv and results.parquet has one row per point (its columns are
listed in gptlab/sweep_points.py, which also expands the points and names them).
OUT_DIR/sweep.json lists the swept keys for `gptlab plot`.

Limits: points run one at a time. A point whose settings changed since it ran (another
base or preset) is reported as a conflict, not rerun; delete its folder to rerun it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpt.config import ConfigError, build_config, config_to_dict, option
from gpt.files import atomic_write_text
from gptlab.sweep_points import (
    DONE_FILE,
    FAILED_FILE,
    LENGTH_FILE,
    LOG_FILE,
    POINT_FILE,
    Point,
    expand_points,
    is_finished,
    point_row,
    swept_keys,
    write_table,
)

logger = logging.getLogger(__name__)

SHARED_DIR = "_shared"


@dataclass
class SweepConfig:
    """Configuration of `gptlab sweep`."""

    stage: str = option("pretrain", "stage to run at every point, as on the command line (pretrain, sft, dpo, ...)")
    out_dir: str = option("runs/sweep", "sweep folder: one run folder per point, results.csv, results.parquet and sweep.json")
    presets: list[str] = option([], "presets of the stage applied to every point, in order (for example tiny)")
    base: dict[str, Any] = option({}, "overrides every point shares: dotted field names (model.n_layer) or nested mappings")
    grid: dict[str, Any] = option({}, "dotted field name -> list of values; the points are the cartesian product of the lists")
    points: list[Any] = option([], "explicit points, each a mapping of dotted field names to values; combined with every grid point")
    seeds: list[int] = option([], "run every point once per seed, set in seed_field; empty for the stage's own seed")
    seed_field: str = option("train.seed", "field of the stage that each seed sets")
    point_paths: dict[str, str] = option({"out_dir": "{point}"}, "fields set to a path in each point's folder, where {point} is that folder; dpo would use {out_dir: '{point}/dpo'}")
    share_data: bool = option(True, "pretrain only: train the tokenizer and tokenize the corpus once, in OUT_DIR/_shared, and link them into every point (skipped when a point changes a data.* field)")
    length_eval: list[float] = option([], "pretrain only: also measure validation loss at these multiples of block_size (2 = twice the training length); learned positions get no value above 1")
    length_eval_tokens: int = option(32768, "validation tokens per length evaluation (at most the whole validation split)")
    timeout_s: float = option(0.0, "stop a point that runs longer than this many seconds, 0 for no limit")
    retry_failed: bool = option(True, "run points that failed before again; false skips them")
    dry_run: bool = option(False, "check every point's config and print the points and their commands, without running them")

    def problems(self) -> list[str]:
        found = []
        if not self.out_dir:
            found.append("out_dir must be a folder path, got an empty string")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                found.append(f"grid.{key} must be a non-empty list of values, got {values!r}; "
                             f"write {key}: [a, b] to sweep it, or move a single value to base")
        for index, point in enumerate(self.points):
            if not isinstance(point, Mapping) or not point:
                found.append(f"points[{index}] must be a mapping of field names to values, got {point!r}")
        if len(set(self.seeds)) != len(self.seeds):
            found.append(f"seeds must be distinct, got {self.seeds}")
        bad = [key for key, template in self.point_paths.items() if "{point}" not in template]
        if bad:
            found.append(f"point_paths values must contain {{point}}; fix {bad}")
        if any(not (m > 0 and math.isfinite(m)) for m in self.length_eval):
            found.append(f"length_eval must list positive multiples of block_size, got {self.length_eval}")
        if self.length_eval_tokens < 1:
            found.append(f"length_eval_tokens must be 1 or more, got {self.length_eval_tokens}")
        if self.length_eval and (self.stage != "pretrain" or self.point_paths.get("out_dir") != "{point}"):
            found.append(f"length_eval reads a pretraining run folder, so it needs stage pretrain and "
                         f"point_paths.out_dir '{{point}}', got stage {self.stage!r} and point_paths {self.point_paths}")
        if self.timeout_s < 0:
            found.append(f"timeout_s must be 0 (no limit) or more, got {self.timeout_s}")
        return found


# ---------------------------------------------------------------------------
# Checking and running points


def stage_config_class(stage: str) -> type:
    from gptlab.cli import STAGES, StageLoadError, import_object

    if stage not in STAGES or stage in ("sweep", "plot"):
        runnable = [name for name in STAGES if name not in ("sweep", "plot")]
        raise ValueError(f"sweep stage {stage!r} is not a runnable stage; use one of {', '.join(runnable)}")
    try:
        return import_object(STAGES[stage].config)
    except StageLoadError as exc:
        raise ValueError(f"cannot load stage {stage!r} for the sweep: {exc}") from None


def check_points(cfg: SweepConfig, points: list[Point]) -> list[Any]:
    """Build every point's stage config; return them, or raise one error listing every problem.

    Raises:
        ValueError: an unknown preset, invalid settings at some points (each listed with
            its point), or a finished point whose saved settings differ from the current ones.
    """
    from gptlab.presets import get_preset

    config_cls = stage_config_class(cfg.stage)
    problems: list[str] = []
    presets = []
    for name in cfg.presets:
        try:
            presets.append((name, get_preset(cfg.stage, name)))
        except ValueError as exc:
            problems.append(str(exc))
    configs = []
    for point in points:
        try:
            configs.append(build_config(config_cls, presets=[*presets, (f"sweep point {point.name}", point.settings)]))
        except ConfigError as exc:
            problems += [f"point {point.name}: {problem}" for problem in exc.problems]
        if is_finished(cfg, point) and ran_with_other_settings(cfg, point):
            problems.append(f"point {point.name} finished with other settings or presets than the sweep file "
                            f"gives now (see {point.folder / POINT_FILE}); delete {point.folder} to run it "
                            f"again, or use another out_dir")
    if problems:
        raise ValueError("invalid sweep:\n  " + "\n  ".join(problems))
    return configs


def ran_with_other_settings(cfg: SweepConfig, point: Point) -> bool:
    """Check whether the point's recorded run (done marker, else its config file) used other settings.

    The point_paths fields are left out of the comparison: they follow the folder, so a
    sweep folder that was moved or copied still resumes."""
    def comparable(settings: dict) -> dict:
        return {key: value for key, value in settings.items() if key not in cfg.point_paths}

    # Compare values as the files store them (YAML and JSON turn tuples into lists).
    settings = comparable(yaml.safe_load(yaml.safe_dump(point.settings)))
    done = point.folder / DONE_FILE
    if done.exists():
        record = json.loads(done.read_text(encoding="utf-8"))
        return (comparable(record.get("settings", {})) != json.loads(json.dumps(settings))
                or record.get("presets") != list(cfg.presets))
    saved = point.folder / POINT_FILE
    return saved.exists() and comparable(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}) != settings

def child_environment() -> dict[str, str]:
    """Build the environment of a point's process: progress bars off, and this checkout of gptlab
    first on PYTHONPATH, so the child runs the same code as the sweep."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "GPTLAB_NO_PROGRESS": "1", "PYTHONPATH": root + (os.pathsep + path if path else "")}


def point_command(cfg: SweepConfig, point: Point) -> list[str]:
    presets = [arg for name in cfg.presets for arg in ("--preset", name)]
    return [sys.executable, "-m", "gptlab", cfg.stage, *presets, "--config", str(point.folder / POINT_FILE)]


@contextmanager
def stop_children_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the sweep runs, so that `subprocess.run` kills the
    running point's process instead of leaving it orphaned. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_point(cfg: SweepConfig, point: Point) -> bool:
    """Run one point in its own process; return True when it exited with status 0."""
    point.folder.mkdir(parents=True, exist_ok=True)
    for stale in (DONE_FILE, FAILED_FILE):
        (point.folder / stale).unlink(missing_ok=True)
    atomic_write_text(point.folder / POINT_FILE, yaml.safe_dump(point.settings, sort_keys=False))
    command = point_command(cfg, point)
    start = time.perf_counter()
    reason = None
    with open(point.folder / LOG_FILE, "w", encoding="utf-8") as log:
        try:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(),
                                    timeout=cfg.timeout_s or None)
            if result.returncode != 0:
                reason = f"exit status {result.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"timed out after {cfg.timeout_s:g} s"
    record = {"name": point.name, "overrides": point.overrides, "seed": point.seed, "presets": list(cfg.presets),
              "settings": point.settings, "command": command, "process_s": time.perf_counter() - start}
    if reason is not None:
        tail = (point.folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
        atomic_write_text(point.folder / FAILED_FILE, json.dumps({**record, "reason": reason, "log_tail": tail},
                                                                 indent=2) + "\n")
        logger.error("point %s failed (%s); its output is in %s", point.name, reason, point.folder / LOG_FILE)
        return False
    atomic_write_text(point.folder / DONE_FILE, json.dumps(record, indent=2) + "\n")
    return True


def shares_data(cfg: SweepConfig, configs: list[Any]) -> bool:
    """Check whether the points of a pretraining sweep can share one tokenizer and one set of
    shards, which needs the point folders as run folders and the same data settings everywhere."""
    if cfg.stage != "pretrain" or not cfg.share_data or cfg.point_paths.get("out_dir") != "{point}":
        return False
    first = config_to_dict(configs[0].data)
    return all(config_to_dict(config.data) == first for config in configs)


def prepare_shared(cfg: SweepConfig, stage_config: Any) -> Path:
    """Train the tokenizer and write the token shards once, with `gptlab prepare`.

    Raises:
        ValueError: the prepare stage failed; the message names its log.
    """
    shared = Path(cfg.out_dir) / SHARED_DIR
    shared.mkdir(parents=True, exist_ok=True)
    settings = {"out_dir": str(shared), "data": config_to_dict(stage_config.data)}
    atomic_write_text(shared / POINT_FILE, yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-m", "gptlab", "prepare", "--config", str(shared / POINT_FILE)]
    logger.info("preparing the shared tokenizer and token shards in %s", shared)
    with open(shared / LOG_FILE, "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment())
    if result.returncode != 0:
        raise ValueError(f"preparing the shared data failed (exit status {result.returncode}); "
                         f"see {shared / LOG_FILE}")
    return shared


def link_shared(shared: Path, point: Point) -> None:
    """Link the shared tokenizer.json, its tokenizer_meta.json and data/ into the point's run folder
    (relative links)."""
    from pretrain.prepare import TOKENIZER_FILE, TOKENIZER_META_FILE

    point.folder.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, TOKENIZER_META_FILE, "data"):
        link = point.folder / name
        # A _shared folder prepared before tokenizer_meta.json existed has no record to link.
        if (shared / name).exists() and not link.exists() and not link.is_symlink():
            link.symlink_to(os.path.relpath(shared / name, point.folder))


# ---------------------------------------------------------------------------
# Length evaluation (pretraining)


def evaluate_lengths(run_dir: Path, multiples: list[float], max_tokens: int) -> dict[str, float | None]:
    """Measure validation loss and bits per byte of a pretrained checkpoint at multiples of its block_size.

    Windows of round(multiple * block_size) tokens are evaluated one after the other over
    the first `max_tokens` validation tokens. A model with learned positions has no
    embedding for positions past block_size, so its values above 1x are None.

    Returns:
        {"val_loss_2x": ..., "val_bpb_2x": ..., ...} for each multiple.
    """
    import torch

    from gpt.checkpoint import load_model
    from gpt.device import resolve_device
    from gpt.shards import TokenShards, read_meta
    from pretrain.train import evaluate_bits_per_byte

    device = resolve_device("auto")
    model = load_model(run_dir / "pretrain", device=device).eval()
    val = TokenShards(run_dir / "data", "val").tokens
    split = read_meta(run_dir / "data")["splits"]["val"]
    bytes_per_token = split["bytes"] / max(split["tokens"], 1)
    block_size = model.config.block_size
    results: dict[str, float | None] = {}
    for multiple in multiples:
        suffix = f"{multiple:g}x"
        length = max(1, round(multiple * block_size))
        if model.config.pos_encoding == "learned" and length > block_size:
            results[f"val_loss_{suffix}"] = results[f"val_bpb_{suffix}"] = None
            continue
        windows = max(1, min(max_tokens, len(val) - 1) // length)
        batch_size = min(8, windows)
        with torch.no_grad():
            values = evaluate_bits_per_byte(model, val, bytes_per_token, length, batch_size,
                                            math.ceil(windows / batch_size))
        results[f"val_loss_{suffix}"] = values.get("val_loss")
        results[f"val_bpb_{suffix}"] = values.get("val_bpb")
    return results


# ---------------------------------------------------------------------------
# The stage


def run(cfg: SweepConfig) -> Any:
    """Run the `sweep` stage: check every point, run the unfinished ones, write the results table.

    Returns:
        The results table (a pandas DataFrame).

    Raises:
        ValueError: invalid settings at any point, before anything runs; or, after the
            table is written, one or more points failed (the message lists them).
    """
    points = expand_points(cfg)
    configs = check_points(cfg, points)
    out_dir = Path(cfg.out_dir)
    if cfg.dry_run:
        for point in points:
            state = "done" if is_finished(cfg, point) else "to run"
            print(f"{point.name}  [{state}]  {json.dumps(point.overrides)}")
            print("    " + " ".join(point_command(cfg, point)))
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "sweep.json", json.dumps(
        {"stage": cfg.stage, "swept_keys": swept_keys(cfg), "seed_field": cfg.seed_field if cfg.seeds else None,
         "points": [p.name for p in points]}, indent=2) + "\n")

    todo = [p for p in points if not is_finished(cfg, p)
            and (cfg.retry_failed or not (p.folder / FAILED_FILE).exists())]
    logger.info("sweep of %d points in %s: %d finished, %d to run", len(points), out_dir,
                len(points) - len(todo), len(todo))
    failed = []
    with stop_children_on_sigterm():
        shared = prepare_shared(cfg, configs[0]) if todo and shares_data(cfg, configs) else None
        for index, point in enumerate(todo, start=1):
            logger.info("point %d/%d: %s", index, len(todo), point.name)
            if shared is not None:
                link_shared(shared, point)
            if not run_point(cfg, point):
                failed.append(point.name)
    if cfg.stage == "pretrain" and cfg.length_eval:
        for point in points:
            if is_finished(cfg, point) and not (point.folder / LENGTH_FILE).exists():
                logger.info("length evaluation of %s at %s x block_size", point.name, cfg.length_eval)
                results = evaluate_lengths(point.folder, cfg.length_eval, cfg.length_eval_tokens)
                atomic_write_text(point.folder / LENGTH_FILE, json.dumps(results, indent=2) + "\n")

    table = write_table([point_row(cfg, p) for p in points], out_dir)
    logger.info("results: %s and %s", out_dir / "results.csv", out_dir / "results.parquet")
    shown = [c for c in ["name", "status", "params", "tokens_seen", "elapsed_s", "best_val_loss", "best_val_bpb",
                         *[c for c in table.columns if c.startswith("val_loss_")]] if c in table.columns]
    print(table[shown].to_string(index=False))
    if failed:
        raise ValueError(f"{len(failed)} of {len(todo)} points failed: {', '.join(failed)}. Each point's output is "
                         f"in its {LOG_FILE}; run the same command again to retry them")
    return table
