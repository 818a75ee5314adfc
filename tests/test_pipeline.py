"""`gptlab run --preset tiny` on the real data: every stage, the report card, and a second
run that continues instead of starting over."""

import json
import os

import pytest

from gptlab.cli import main

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
