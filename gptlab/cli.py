"""The `gptlab` command: run one pipeline stage from its config.

    gptlab STAGE [--config FILE.yaml] [--preset NAME] [--FIELD VALUE ...] [FIELD=VALUE ...]
    gptlab STAGE --help
    gptlab --help
    gptlab --version

A stage is a config dataclass and a function that takes it, registered in `STAGES`
as "module:attribute" paths. They are imported only when the stage is named, so
`gptlab --help` stays fast and a stage whose module is missing fails with one
message. Field values apply in the order of `gpt.config.build_config`: defaults,
presets, the YAML file, then the command line.

Exit status: 0 on success. 2 for invalid settings, and for a ValueError,
FileNotFoundError or NotImplementedError raised by the stage (set GPTLAB_DEBUG=1 for the traceback).
1 when the stage's code cannot be imported. Other exceptions propagate.

The names --config, --preset and --help belong to the command line, so a stage
field with one of those names can only be set as FIELD=VALUE.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import types
import typing
from typing import Any, NamedTuple, Union

from gpt.config import ConfigError, build_config
from gpt.config_fields import describe_fields, describe_groups, field_type
from gpt.config_values import FALSE_WORDS, TRUE_WORDS
from gptlab.presets import get_preset, preset_names

USAGE = "gptlab STAGE [--config FILE.yaml] [--preset NAME] [--FIELD VALUE ...] [FIELD=VALUE ...]"


class Stage(NamedTuple):
    """A runnable stage: where its config class and its function live, and what it does."""

    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the config instance
    description: str


# Pipeline order, which is also the order of `gptlab --help`.
STAGES: dict[str, Stage] = {
    "prepare": Stage("pretrain.prepare:PrepareConfig", "pretrain.prepare:run", "tokenize a text corpus into token shards for pretraining"),
    "pretrain": Stage("pretrain.train:PretrainConfig", "pretrain.train:train", "pretrain a GPT on token shards (next-token prediction)"),
    "inspect-data": Stage("finetune.inspect_data:InspectConfig", "finetune.inspect_data:run", "show rendered chat examples, trained tokens and counts before fine-tuning"),
    "sft": Stage("finetune.sft:SFTConfig", "finetune.sft:train", "supervised instruction tuning on chat data, full or LoRA"),
    "merge": Stage("gptlab.merge:MergeConfig", "gptlab.merge:run", "fold a LoRA adapter into its base model's weights"),
    "reward": Stage("rlhf.reward:RewardConfig", "rlhf.reward:train", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": Stage("rlhf.dpo:DPOConfig", "rlhf.dpo:train", "align a chat model on preference pairs with DPO, IPO or conservative DPO"),
    "ppo": Stage("rlhf.ppo:PPOConfig", "rlhf.ppo:train", "align a chat model with PPO or GRPO against a reward model or a verifiable task"),
    "eval": Stage("evals.harness:EvalConfig", "evals.harness:run", "evaluate a checkpoint on language-modelling, multiple-choice and generation tasks"),
    "sample": Stage("gptlab.sample:SampleConfig", "gptlab.sample:run", "generate text from a checkpoint"),
    "chat": Stage("serve.chat_app:ChatConfig", "serve.chat_app:run", "chat with a model in the browser (Gradio, on 127.0.0.1)"),
    "serve": Stage("serve.api:ServeConfig", "serve.api:run", "serve an OpenAI-compatible HTTP API (and optionally the chat app) on 127.0.0.1"),
    "run": Stage("gptlab.pipeline:RunConfig", "gptlab.pipeline:run", "run the whole pipeline: pretrain, sft, reward, dpo (ppo), eval and the report card"),
    "report": Stage("gptlab.report:ReportConfig", "gptlab.report:run", "write the report card report.md of a run folder from its metrics"),
    "sweep": Stage("gptlab.sweep:SweepConfig", "gptlab.sweep:run", "run a grid of config overrides as separate runs and tabulate the results"),
    "plot": Stage("gptlab.plot:PlotConfig", "gptlab.plot:run", "plot loss curves and metrics from a sweep's results table"),
    "export": Stage("gptlab.export:ExportConfig", "gptlab.export:run", "export a checkpoint to a Hugging Face transformers folder"),
}


def register_stage(name: str, config_cls_path: str, fn_path: str, description: str) -> None:
    """Add a stage to `STAGES`, or replace the one of that name.

    Args:
        name: the STAGE word on the command line.
        config_cls_path: "module:ConfigClass" of the stage's config dataclass.
        fn_path: "module:function" that runs the stage with a config instance.
        description: one line for `gptlab --help`.
    """
    STAGES[name] = Stage(config_cls_path, fn_path, description)


class StageLoadError(Exception):
    """A registered stage's module or attribute cannot be imported."""


def import_object(path: str) -> Any:
    """Import the attribute named by "module:attribute".

    Raises:
        StageLoadError: the module, a module it imports, or the attribute is missing.
    """
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if module_name == missing or module_name.startswith(missing + "."):
            raise StageLoadError(f"module {module_name} does not exist") from exc
        message = f"importing {module_name} failed because module {missing} was not found"
        if importlib.util.find_spec(missing.partition(".")[0]) is None:
            message += ". Install the package that provides it"
        raise StageLoadError(message) from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise StageLoadError(f"module {module_name} has no attribute {attribute}") from exc


# ---------------------------------------------------------------------------
# Arguments


@dataclasses.dataclass
class Arguments:
    """The command line of one stage, split into its parts."""

    help: bool = False
    config_file: str | None = None
    presets: list[str] = dataclasses.field(default_factory=list)
    overrides: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def _is_bool(tp: Any) -> bool:
    if tp is bool:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return set(typing.get_args(tp)) == {bool, type(None)}
    return False


def _next_value(argv: list[str], index: int) -> str | None:
    """Return argv[index] if it can be the value of an option, else None."""
    if index < len(argv) and not argv[index].startswith("--"):
        return argv[index]
    return None


def parse_arguments(config_cls: type, argv: list[str]) -> Arguments:
    """Split a stage's command line into the config file, presets and overrides.

    Accepts --FIELD VALUE, --FIELD=VALUE and FIELD=VALUE. A bool field given as
    --FIELD alone is true, unless a bool word (true/false/yes/no/on/off/1/0)
    follows it, and --no-FIELD sets it to false. -h or --help anywhere but in
    the place of a value sets `help`. Keys are checked later, by `build_config`.
    Problems with the command line itself go to `problems`.
    """
    args = Arguments()
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1

        if token in ("-h", "--help"):
            args.help = True
            continue
        if not token.startswith("--"):
            if "=" in token:
                key, _, value = token.partition("=")
                args.overrides.append((key, value))
            else:
                args.problems.append(
                    f"unexpected argument {token!r}. Give field values as FIELD=VALUE or --FIELD VALUE."
                )
            continue

        key, has_value, value = token[2:].partition("=")
        next_value = None if has_value else _next_value(argv, index)

        if key in ("config", "preset"):
            if not has_value:
                if next_value is None:
                    args.problems.append(f"--{key} needs a value: --{key} {'FILE.yaml' if key == 'config' else 'NAME'}.")
                    continue
                value = next_value
                index += 1
            if key == "preset":
                args.presets.append(value)
            elif args.config_file is not None:
                args.problems.append(f"--config is given twice ({args.config_file!r} and {value!r}). Give one file.")
            else:
                args.config_file = value
            continue

        if has_value:
            args.overrides.append((key, value))
            continue

        tp = field_type(config_cls, key)
        negated = key[3:] if key[:3] in ("no-", "no_") else ""
        if _is_bool(tp):
            if next_value is not None and next_value.lower() in TRUE_WORDS + FALSE_WORDS:
                args.overrides.append((key, next_value))
                index += 1
            else:
                args.overrides.append((key, "true"))
        elif tp is None and negated and _is_bool(field_type(config_cls, negated)):
            args.overrides.append((negated, "false"))
        elif next_value is not None and (tp is not None or "=" not in next_value):
            args.overrides.append((key, next_value))
            index += 1
        elif tp is None:
            # No such field, so build_config reports the key with spelling suggestions.
            # A FIELD=VALUE after it stays a separate setting.
            args.overrides.append((key, ""))
        else:
            args.problems.append(f"--{key} needs a value: --{key} VALUE or --{key}=VALUE.")
    return args


def build_stage_config(stage_name: str, config_cls: type, args: Arguments) -> Any:
    """Build a stage's config from its parsed command line.

    Raises:
        ConfigError: every problem with the arguments, the presets, the config file
            and the field values, in one message.
    """
    problems = list(args.problems)
    presets = []
    for name in args.presets:
        try:
            presets.append((name, get_preset(stage_name, name)))
        except ValueError as exc:
            problems.append(str(exc))

    try:
        config = build_config(config_cls, config_file=args.config_file, presets=presets, overrides=args.overrides)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, exc.subject) from None
    if problems:
        raise ConfigError(problems, config_cls.__name__)
    return config


# ---------------------------------------------------------------------------
# Help


def format_main_help() -> str:
    """Return the text of `gptlab --help`: usage and the registered stages."""
    width = max(len(name) for name in STAGES)
    lines = [f"usage: {USAGE}", "       gptlab STAGE --help", "       gptlab --version", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.description}" for name, stage in STAGES.items()]
    lines += ["", "Run 'gptlab STAGE --help' to list the fields of a stage and its presets."]
    return "\n".join(lines)


def format_stage_help(stage_name: str, config_cls: type) -> str:
    """Return the text of `gptlab STAGE --help`: every field, grouped by nested config."""
    stage = STAGES[stage_name]
    names = preset_names(stage_name)
    lines = [
        f"usage: {USAGE.replace('STAGE', stage_name)}",
        "",
        stage.description,
        "",
        "Values apply in this order: field defaults, --preset, the --config file, then the command line.",
        "Name a field by its dotted name (model.n_layer) or by a shorter tail that no other field has (n_layer).",
        "A bool field given alone (--FIELD) is set to true, and --no-FIELD sets it to false.",
        "",
        "options:",
        "  --config FILE.yaml  YAML file of field values, nested (model: {n_layer: 4}) or dotted (model.n_layer: 4)",
        "  --preset NAME       apply a named preset. Repeat it to apply several, the later ones winning",
        "  -h, --help          show this help and exit",
        "",
        f"presets: {', '.join(names) if names else 'none'}",
    ]

    rows = [(f"--{path}", type_text, default, help_text) for path, type_text, default, help_text in describe_fields(config_cls)]
    name_width = min(max((len(row[0]) for row in rows), default=0), 32)
    type_width = min(max((len(row[1]) for row in rows), default=0), 24)
    default_width = min(max((len(row[2]) for row in rows), default=0), 16)

    for group, group_help in describe_groups(config_cls):
        group_rows = [row for row in rows if row[0][2:].rpartition(".")[0] == group]
        if not group_rows:
            continue
        heading = "fields" if not group else group
        lines += ["", f"{heading}: {group_help}" if group_help else f"{heading}:"]
        for name, type_text, default, help_text in group_rows:
            lines.append(f"  {name:<{name_width}}  {type_text:<{type_width}}  {default:<{default_width}}  {help_text}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Running


def setup_logging() -> None:
    """Send INFO and above to stderr as "HH:MM:SS LEVEL message", unless logging is already set up."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def package_version() -> str:
    """Return the installed version of the gptlab package, as its metadata records it."""
    try:
        return importlib.metadata.version("gptlab")
    except importlib.metadata.PackageNotFoundError:
        # Run from a checkout that was never installed, so no metadata exists.
        return "unknown (not installed; run pip install -e . in the repository)"


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the gptlab command line and return its exit status.

    Args:
        argv: the arguments after the program name, or None for `sys.argv[1:]`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(format_main_help(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(format_main_help())
        return 0
    if argv[0] == "--version":
        print(f"gptlab {package_version()}")
        return 0

    stage_name, stage_argv = argv[0], argv[1:]
    if stage_name not in STAGES:
        close = difflib.get_close_matches(stage_name, list(STAGES), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        _error(f"unknown stage {stage_name!r}.{hint} Run 'gptlab --help' to list the stages.")
        return 2

    stage = STAGES[stage_name]
    try:
        config_cls = import_object(stage.config)
        args = parse_arguments(config_cls, stage_argv)
        if args.help:
            print(format_stage_help(stage_name, config_cls))
            return 0
        run = import_object(stage.run)
    except StageLoadError as exc:
        _error(f"cannot load stage {stage_name!r}: {exc}.")
        return 1

    try:
        config = build_stage_config(stage_name, config_cls, args)
    except ConfigError as exc:
        _error(f"{exc}\nRun 'gptlab {stage_name} --help' to list the fields and their types.")
        return 2

    setup_logging()
    try:
        run(config)
    except (ValueError, OSError, EOFError, NotImplementedError) as exc:
        # These report bad input (a missing, unreadable or corrupt file, an invalid record,
        # an unsupported combination), so the message is what the user needs, not the traceback.
        if os.environ.get("GPTLAB_DEBUG") == "1":
            raise
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted. Rerun the same command with --resume to continue a training stage from its last "
               "checkpoint; gptlab run continues by itself.")
        return 130
    return 0
