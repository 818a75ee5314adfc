"""`gptlab run --preset tiny` on the real data: every stage, the report card, and a second
run that continues instead of starting over."""

import json
import os

import pytest

from gpt.config import build_config
from gptlab.cli import main
from gptlab.pipeline import RunConfig, stage_plan
from gptlab.report import format_number

pytestmark = pytest.mark.skipif(not os.environ.get("GPTLAB_DATA_DIR"),
                                reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

STAGES = ("pretrain", "sft", "reward", "dpo", "eval")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "tiny"
    assert main(["run", "--preset", "tiny", "--out-dir", str(run)]) == 0
    return run


def test_every_stage_finished(run_dir):
    for stage in STAGES:
        assert (run_dir / stage / "stage_done.json").is_file(), stage
    for stage in ("pretrain", "sft", "reward", "dpo"):
        assert (run_dir / stage / "model.safetensors").is_file(), stage
        assert (run_dir / stage / "loss.png").is_file(), stage


def test_report_card_contents(run_dir):
    report = (run_dir / "report.md").read_text()
    for stage in ("pretrain", "sft", "reward", "dpo"):
        assert f"| {stage} |" in report, stage
    assert "val_bpb" in report
    assert "val_accuracy" in report
    assert "rewards/accuracies" in report
    assert "| arc_easy | acc |" in report
    assert "**User:**" in report
    assert "![dpo loss](dpo/loss.png)" in report


def test_results_json_rows(run_dir):
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    tasks = {row["task"] for row in results}
    assert {"lm", "arc_easy", "blimp", "chat"} <= tasks
    for row in results:
        assert {"task", "metric", "value", "n", "seconds"} <= set(row)


def test_lm_task_reads_held_out_shards(run_dir):
    config = json.loads((run_dir / "eval" / "results.json").read_text())["config"]
    assert config["lm_source"] == str(run_dir / "data")


def test_second_run_skips_done_stages(run_dir, caplog):
    weights = run_dir / "dpo" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["run", "--preset", "tiny", "--out-dir", str(run_dir)]) == 0
    assert weights.stat().st_mtime_ns == before
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == len(STAGES)


def test_interrupted_stage_resumes(run_dir):
    # A stage without its completion marker but with a resume state continues from it.
    (run_dir / "dpo" / "stage_done.json").unlink()
    steps_before = len((run_dir / "dpo" / "metrics.jsonl").read_text().splitlines())
    assert main(["run", "--preset", "tiny", "--out-dir", str(run_dir)]) == 0
    assert (run_dir / "dpo" / "stage_done.json").is_file()
    assert len((run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()) == steps_before


def test_done_stage_with_changed_settings_is_rejected(run_dir, capsys):
    weights = run_dir / "dpo" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["run", "--preset", "tiny", "--out-dir", str(run_dir), "--dpo", "{loss: ipo}"]) == 2
    assert "loss: ran with 'dpo', now 'ipo'" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == before


def test_stage_settings_keep_yaml_types():
    cfg = build_config(RunConfig, overrides={"pretrain": "{model.n_layer: 4, train.compile: false}"})
    settings = stage_plan(cfg)[0][2]
    assert settings["model.n_layer"] == 4
    assert settings["train.compile"] is False


@pytest.mark.parametrize("value, text", [(11090.3, "11,090"), (9805.0, "9,805"), (0.6733, "0.6733"),
                                         (2.5e-4, "0.00025"), (1.5e10, "1.5e+10"), (1234, "1,234")])
def test_report_number_format(value, text):
    assert format_number(value) == text
