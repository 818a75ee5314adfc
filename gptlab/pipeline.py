"""`gptlab run`: the whole pipeline, from raw text to an aligned chat model and its report card.

The stages run in order, each reading the folder of the one before it:

    pretrain -> sft -> reward -> dpo [-> ppo] -> eval -> report.md

Each stage gets the preset named by `size` (when the stage defines one), then the
run's own overrides. A stage finished earlier is skipped: its folder contains the
completion marker written after it returned. A stage that was interrupted resumes
from its resume state. So running the same command again continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpt.config import build_config, config_to_dict, option
from gpt.files import atomic_write_text
from gptlab.cli import STAGES, import_object
from gptlab.presets import PRESETS

logger = logging.getLogger(__name__)

DONE_FILE = "stage_done.json"
RESUME_FILE = "train_state.pt"


@dataclass
class RunConfig:
    """Configuration of `gptlab run`."""

    out_dir: str = option("runs/default", "run folder; each stage writes its own subfolder and report.md goes here")
    size: str = option("cpu", "preset applied to every stage that defines one: tiny (minutes, for tests), cpu (the default), or a GPU preset")
    ppo: bool = option(False, "add a PPO stage against the reward model after DPO; the evaluated model is then the PPO one")
    eval_tasks: list[str] = option(["lm", "arc_easy", "blimp", "lambada", "chat"], "tasks of the eval stage (see gptlab eval --help)")
    eval_limit: int | None = option(None, "maximum examples per evaluation task; none for all")
    pretrain: dict[str, Any] = option({}, "extra settings of the pretrain stage as YAML, for example '{model.n_layer: 4}'")
    sft: dict[str, Any] = option({}, "extra settings of the sft stage as YAML")
    reward: dict[str, Any] = option({}, "extra settings of the reward stage as YAML")
    dpo: dict[str, Any] = option({}, "extra settings of the dpo stage as YAML")
    ppo_settings: dict[str, Any] = option({}, "extra settings of the ppo stage as YAML")
    eval: dict[str, Any] = option({}, "extra settings of the eval stage as YAML")

    def problems(self) -> list[str]:
        return [] if self.out_dir else ["out_dir must be a folder path, got an empty string"]


def stage_plan(cfg: RunConfig) -> list[tuple[str, str, dict]]:
    """List the stages to run as (stage name, output folder, settings), in order."""
    run = Path(cfg.out_dir)
    policy = run / "dpo"
    plan = [
        ("pretrain", str(run / "pretrain"), {"out_dir": str(run), **cfg.pretrain}),
        ("sft", str(run / "sft"), {"base": str(run / "pretrain"), "out_dir": str(run / "sft"), **cfg.sft}),
        ("reward", str(run / "reward"), {"base": str(run / "sft"), "out_dir": str(run / "reward"), **cfg.reward}),
        ("dpo", str(run / "dpo"), {"policy": str(run / "sft"), "out_dir": str(run / "dpo"), **cfg.dpo}),
    ]
    if cfg.ppo:
        plan.append(("ppo", str(run / "ppo"), {"policy": str(run / "dpo"), "reward": str(run / "reward"),
                                              "out_dir": str(run / "ppo"), **cfg.ppo_settings}))
        policy = run / "ppo"
    # The lm task reads the validation split of the run's own shards, the text pretraining
    # held out. The default tinystories-valid is part of the tinystories training source.
    eval_settings = {"checkpoint": str(policy), "out_dir": str(run / "eval"), "tasks": cfg.eval_tasks,
                     "lm_source": str(run / "data"), "reward": str(run / "reward"), "compare": str(run / "sft"),
                     **cfg.eval}
    if cfg.eval_limit is not None:
        eval_settings.setdefault("limit", cfg.eval_limit)
    plan.append(("eval", str(run / "eval"), eval_settings))
    return plan


def stage_config(stage: str, settings: dict, size: str):
    """Build the config of `stage` from its preset named `size` (when it has one) and `settings`."""
    presets = [(f"{stage} preset {size}", PRESETS[stage][size])] if size in PRESETS.get(stage, {}) else []
    return build_config(import_object(STAGES[stage].config), presets=presets, overrides=settings)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_done_stage(stage: str, folder: Path, settings: dict, size: str) -> None:
    """Check that a finished stage ran with the settings this run requests.

    The stage's own config.yaml records what it ran with. It differs when the run's
    command changed, or when the stage was run alone into this folder afterwards. Either
    way, skipping the stage would report a model these settings did not train.

    Raises:
        ValueError: the settings differ; the message names up to five fields and the fix.
    """
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    expected = _flatten(config_to_dict(stage_config(stage, settings, size)))
    # Fields that an older config.yaml lacks are not compared. Pretraining writes the
    # tokenizer's size over model.vocab_size, so data.vocab_size is compared in its place.
    ignored = {"model.vocab_size", "train.resume"}
    changed = sorted(key for key in set(saved) & set(expected) if key not in ignored and saved[key] != expected[key])
    if changed:
        listed = "; ".join(f"{key}: ran with {saved[key]!r}, now {expected[key]!r}" for key in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ValueError(f"{stage}: {folder} finished with other settings than this run requests ({saved_path}: "
                         f"{listed}{more}). Delete {folder} and the stages after it to train it again with these "
                         "settings, or use another --out-dir")


def run_stage(stage: str, folder: Path, settings: dict, size: str) -> None:
    """Build the stage's config from its preset and `settings`, then run it, resuming when it
    left a resume state behind."""
    overrides = dict(settings)
    if (folder / RESUME_FILE).exists():
        overrides["train.resume"] = True
        logger.info("%s: resuming from %s", stage, folder / RESUME_FILE)
    config = stage_config(stage, overrides, size)
    spec = STAGES[stage]
    started = time.time()
    import_object(spec.run)(config)
    atomic_write_text(folder / DONE_FILE, json.dumps({"stage": stage, "seconds": time.time() - started}) + "\n")


def run(cfg: RunConfig) -> Path:
    """Run every stage not yet done, then write the report card (the `run` stage)."""
    from gptlab.report import ReportConfig
    from gptlab.report import run as write_report

    for stage, folder, settings in stage_plan(cfg):
        folder = Path(folder)
        if (folder / DONE_FILE).exists():
            check_done_stage(stage, folder, settings, cfg.size)
            logger.info("%s: done earlier (%s), skipped", stage, folder / DONE_FILE)
            continue
        logger.info("%s: starting, writes %s", stage, folder)
        run_stage(stage, folder, settings, cfg.size)
    report = write_report(ReportConfig(run_dir=cfg.out_dir))
    logger.info("report card: %s; chat with: gptlab chat --checkpoint %s", report,
                Path(cfg.out_dir) / ("ppo" if cfg.ppo else "dpo"))
    return report
