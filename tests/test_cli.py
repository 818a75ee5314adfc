"""Tests for the gptlab command line, run against a small stage defined here."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from gpt.config import option
from gptlab import cli, presets
from gptlab.cli import Stage, main, parse_arguments, register_stage
from gptlab.presets import get_preset

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoModel:
    n_layer: int = option(2, "number of transformer blocks")
    n_head: int = option(4, "number of attention heads")
    n_embd: int = option(32, "width of the residual stream")
    bias: bool = option(True, "add biases to linear layers")


@dataclass
class DemoConfig:
    name: str = option("demo", "run name")
    steps: int = option(10, "optimizer steps")
    compile: bool = option(False, "compile the model with torch.compile")
    schedule: Literal["cosine", "wsd"] = option("cosine", "learning-rate schedule")
    model: DemoModel = option(DemoModel, "model architecture")

    def problems(self) -> list[str]:
        if self.model.n_embd % self.model.n_head:
            return [f"model.n_embd ({self.model.n_embd}) must be divisible by model.n_head ({self.model.n_head})."]
        return []


RUNS: list[DemoConfig] = []


def run_demo(cfg: DemoConfig) -> None:
    """Record the config, then raise the error that `cfg.name` selects, if any."""
    logging.getLogger(__name__).info("demo stage ran with %d steps", cfg.steps)
    RUNS.append(cfg)
    if cfg.name == "bad-input":
        raise ValueError("record 3 of data.jsonl has no 'text' field")
    if cfg.name == "missing":
        raise FileNotFoundError("data.jsonl not found")
    if cfg.name == "crash":
        raise RuntimeError("internal failure")


@pytest.fixture(autouse=True)
def demo_stage(monkeypatch):
    monkeypatch.setattr(cli, "STAGES", dict(cli.STAGES))
    monkeypatch.setattr(presets, "PRESETS", dict(presets.PRESETS))
    register_stage("demo", f"{__name__}:DemoConfig", f"{__name__}:run_demo", "a stage for tests")
    presets.PRESETS["demo"] = {"small": {"steps": 2, "model": {"n_layer": 1}}, "fast": {"compile": True}}
    monkeypatch.delenv("GPTLAB_DEBUG", raising=False)
    RUNS.clear()


def run_ok(*argv: str) -> DemoConfig:
    assert main(["demo", *argv]) == 0
    return RUNS[-1]


# --- running a stage ---


def test_runs_stage_with_overrides():
    cfg = run_ok("--steps", "3", "n_layer=4", "--model.n-embd=64", "--name", "x")
    assert cfg.steps == 3
    assert cfg.model.n_layer == 4
    assert cfg.model.n_embd == 64
    assert cfg.name == "x"


def test_defaults_without_arguments():
    assert run_ok() == DemoConfig()


def test_bare_flag_is_true():
    assert run_ok("--compile").compile is True


def test_bare_flag_before_setting():
    cfg = run_ok("--compile", "steps=2")
    assert cfg.compile is True
    assert cfg.steps == 2


def test_bare_flag_before_option():
    cfg = run_ok("--compile", "--steps", "2")
    assert cfg.compile is True
    assert cfg.steps == 2


@pytest.mark.parametrize("word, expected", [("false", False), ("true", True), ("0", False), ("yes", True)])
def test_flag_with_value(word, expected):
    assert run_ok("--compile", word).compile is expected


def test_no_flag_is_false():
    assert run_ok("--no-bias").model.bias is False


def test_negative_number_value():
    assert run_ok("--steps", "-1").steps == -1


def test_config_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: 5\nmodel:\n  n_layer: 3\n")
    cfg = run_ok("--config", str(config_file), "n_layer=6")
    assert cfg.steps == 5
    assert cfg.model.n_layer == 6


def test_config_file_equals_form(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: 5\n")
    assert run_ok(f"--config={config_file}").steps == 5


def test_preset_then_file_then_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: 5\n")
    cfg = run_ok("--preset", "small", "--config", str(config_file), "--name", "x")
    assert cfg.model.n_layer == 1  # from the preset
    assert cfg.steps == 5  # the file beats the preset
    assert cfg.name == "x"


def test_two_presets():
    cfg = run_ok("--preset", "small", "--preset=fast")
    assert cfg.steps == 2
    assert cfg.compile is True


# --- invalid input ---


def test_bad_values_exit_2(capsys):
    assert main(["demo", "--steps", "x", "schedule=step", "--n_embd", "30", "--n_layr", "2"]) == 2
    captured = capsys.readouterr()
    assert "steps: expected an integer but received 'x'" in captured.err
    assert "schedule: expected one of 'cosine', 'wsd' but received 'step'" in captured.err
    assert "model.n_embd (30) must be divisible by model.n_head (4)" in captured.err
    assert "unknown field 'n_layr' from the command line. Did you mean model.n_layer?" in captured.err
    assert captured.err.startswith("error: invalid DemoConfig: 4 problems\n")
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert RUNS == []


def test_missing_value(capsys):
    assert main(["demo", "--steps"]) == 2
    assert "--steps needs a value" in capsys.readouterr().err


def test_unexpected_argument(capsys):
    assert main(["demo", "steps"]) == 2
    assert "unexpected argument 'steps'" in capsys.readouterr().err


def test_config_given_twice(capsys):
    assert main(["demo", "--config", "a.yaml", "--config", "b.yaml"]) == 2
    assert "--config is given twice" in capsys.readouterr().err


def test_config_file_not_found(capsys, tmp_path):
    assert main(["demo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' not found" in capsys.readouterr().err


def test_unknown_preset_lists_known(capsys):
    assert main(["demo", "--preset", "smal", "--steps", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'smal' for stage 'demo'. Known presets: fast, small. Did you mean small?" in err
    assert "steps: expected an integer" in err


def test_unknown_option_keeps_next_setting(capsys):
    assert main(["demo", "--compil", "n_layr=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'compil'" in err
    assert "unknown field 'n_layr'" in err


def test_parse_arguments_parts():
    args = parse_arguments(DemoConfig, ["--config", "a.yaml", "--preset", "p", "--compile", "x=1", "--steps=2"])
    assert args.config_file == "a.yaml"
    assert args.presets == ["p"]
    assert args.overrides == [("compile", "true"), ("x", "1"), ("steps", "2")]
    assert args.problems == []


# --- errors raised by a stage ---


def test_stage_value_error_clean(capsys):
    assert main(["demo", "--name", "bad-input"]) == 2
    err = capsys.readouterr().err
    assert err == "error: record 3 of data.jsonl has no 'text' field\n"


def test_stage_file_not_found_clean(capsys):
    assert main(["demo", "--name", "missing"]) == 2
    assert capsys.readouterr().err == "error: data.jsonl not found\n"


def test_stage_error_debug_raises(monkeypatch):
    monkeypatch.setenv("GPTLAB_DEBUG", "1")
    with pytest.raises(ValueError, match="no 'text' field"):
        main(["demo", "--name", "bad-input"])


def test_stage_other_error_propagates():
    with pytest.raises(RuntimeError, match="internal failure"):
        main(["demo", "--name", "crash"])


# --- stages and help ---


def test_stage_help(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: gptlab demo" in out
    assert "a stage for tests" in out
    assert "compile the model with torch.compile" in out
    assert "number of transformer blocks" in out
    assert "presets: fast, small" in out
    assert "model: model architecture" in out
    assert re.search(r"--model\.n_layer +int +2 +number of transformer blocks", out)
    assert re.search(r"--schedule +\{cosine,wsd\} +cosine +learning-rate schedule", out)
    assert RUNS == []


def test_stage_help_short_flag(capsys):
    assert main(["demo", "steps=x", "-h"]) == 0
    assert "optimizer steps" in capsys.readouterr().out


def test_help_word_as_value():
    assert run_ok("--name", "-h").name == "-h"


def test_main_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prepare", "pretrain", "sample", "export", "demo"):
        assert re.search(rf"^  {name} ", out, re.MULTILINE)
    assert "a stage for tests" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gptlab {importlib.metadata.version('gptlab')}\n"


def test_version_matches_pyproject(capsys):
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gptlab {declared}\n"


def test_version_not_installed(capsys, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "gptlab unknown (not installed; run pip install -e . in the repository)\n"


def test_no_arguments_usage(capsys):
    assert main([]) == 2
    assert "usage: gptlab STAGE" in capsys.readouterr().err


def test_unknown_stage(capsys):
    assert main(["dmeo"]) == 2
    assert "unknown stage 'dmeo'. Did you mean demo?" in capsys.readouterr().err


def test_stage_module_missing(capsys):
    register_stage("ghost", "no_such_module_gptlab:Config", "no_such_module_gptlab:run", "missing")
    assert main(["ghost", "--help"]) == 1
    err = capsys.readouterr().err
    assert err == "error: cannot load stage 'ghost': module no_such_module_gptlab does not exist.\n"


def test_stage_attribute_missing(capsys):
    register_stage("ghost", f"{__name__}:DemoConfig", f"{__name__}:no_such_function", "missing")
    assert main(["ghost"]) == 1
    assert f"module {__name__} has no attribute no_such_function" in capsys.readouterr().err


def test_registered_stage_paths():
    assert cli.STAGES["pretrain"] == Stage(
        "pretrain.train:PretrainConfig", "pretrain.train:train", cli.STAGES["pretrain"].description
    )
    assert cli.STAGES["prepare"].config == "pretrain.prepare:PrepareConfig"
    assert cli.STAGES["sample"].run == "gptlab.sample:run"
    assert cli.STAGES["export"].run == "gptlab.export:run"


# --- presets ---


def test_pretrain_presets_build_valid_configs():
    from gpt.config import build_config
    from pretrain.train import PretrainConfig

    assert {"tiny", "cpu", "gpt2-small", "gpt2-medium"} <= set(presets.PRESETS["pretrain"])
    for name in presets.PRESETS["pretrain"]:
        cfg = build_config(PretrainConfig, presets=[get_preset("pretrain", name)])
        assert cfg.model.n_embd % cfg.model.n_head == 0, name


def test_get_preset_returns_copy():
    get_preset("demo", "small")["model"]["n_layer"] = 99
    assert presets.PRESETS["demo"]["small"]["model"]["n_layer"] == 1


def test_get_preset_unknown_stage():
    with pytest.raises(ValueError, match="stage 'sample' has no presets"):
        get_preset("sample", "tiny")


# --- runs in a fresh interpreter ---


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def test_python_m_gptlab_help():
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "--help"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    assert "pretrain" in result.stdout
    assert result.stderr == ""


def test_subprocess_logging_and_exit_code():
    code = (
        "import sys; from gptlab import cli; "
        "cli.register_stage('demo', 'test_cli:DemoConfig', 'test_cli:run_demo', 'demo'); "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "demo", "--steps", "3"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO demo stage ran with 3 steps\n", ok.stderr)

    bad = subprocess.run(
        [sys.executable, "-c", code, "demo", "--steps", "x"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert "steps: expected an integer but received 'x'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_interrupt_prints_one_line(monkeypatch, capsys, tmp_path):
    import pretrain.train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain.train, "train", interrupted)
    assert main(["pretrain", "--out-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted. Rerun the same command with --resume")
    assert "Traceback" not in err
