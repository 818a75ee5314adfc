"""Sweeps and their plots: point names and expansion, checks before running, and the result
columns. End to end on the real corpus: a two-point pretraining sweep with its table and
figures, resuming after an interrupted point, and a failing point that does not stop the
others."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gptlab.cli import main
from gptlab.plot import PlotConfig, default_group, summarize
from gptlab.plot import run as plot
from gptlab.sweep import SweepConfig, check_points
from gptlab.sweep_points import DONE_FILE, FAILED_FILE, eval_columns, expand_points, metric_columns, point_name

DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

# The tiny preset cut down to a few seconds per point.
SMALL_BASE = {
    "data.vocab_size": 512,
    "model": {"n_embd": 32, "block_size": 32},
    "train": {"batch_size": 4, "max_steps": 4, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 4,
              "dtype": "float32", "device": "cpu"},
    "sample_tokens": 0,
}


# ---------------------------------------------------------------------------
# Points


def test_point_name_sorted_by_short_key():
    name = point_name({"model.pos_encoding": "rope", "model.block_size": 64}, seed=2, seed_field="train.seed")
    assert name == "block_size=64,pos_encoding=rope,seed=2"


def test_point_name_keeps_colliding_keys_whole():
    name = point_name({"model.dropout": 0.1, "lora.dropout": 0.0}, seed=None, seed_field="train.seed")
    assert name == "lora.dropout=0.0,model.dropout=0.1"


def test_point_name_values_formatted():
    name = point_name({"flag": True, "window": None, "sources": ["a b", "c/d"]}, seed=None, seed_field="seed")
    assert name == "flag=true,sources=a-b+c-d,window=none"


def test_long_point_name_cut_with_hash():
    long_a = point_name({"sources": "x" * 200}, seed=None, seed_field="seed")
    long_b = point_name({"sources": "x" * 199 + "y"}, seed=None, seed_field="seed")
    assert len(long_a) == 100
    assert long_a != long_b


def test_expand_grid_times_points_times_seeds(tmp_path):
    cfg = SweepConfig(out_dir=str(tmp_path), base={"train": {"max_steps": 5}},
                      grid={"model.pos_encoding": ["rope", "alibi"]},
                      points=[{"model.block_size": 64}, {"model": {"block_size": 128}}], seeds=[1, 2])
    points = expand_points(cfg)

    assert len(points) == 8
    assert points[0].name == "block_size=64,pos_encoding=rope,seed=1"
    assert points[3].overrides == {"model.pos_encoding": "rope", "model.block_size": 128}
    assert points[3].settings["train.seed"] == 2
    assert points[3].settings["model"] == {"block_size": 128}
    assert points[0].settings["out_dir"] == str(tmp_path / points[0].name)
    assert points[0].settings["train"] == {"max_steps": 5}


def test_expand_without_grid_is_one_point(tmp_path):
    points = expand_points(SweepConfig(out_dir=str(tmp_path)))
    assert [p.name for p in points] == ["base"]


def test_duplicate_points_rejected(tmp_path):
    cfg = SweepConfig(out_dir=str(tmp_path), points=[{"model.n_layer": 2}, {"model": {"n_layer": 2}}])
    with pytest.raises(ValueError, match="both get the folder name 'n_layer=2'"):
        expand_points(cfg)


def test_grid_value_must_be_list():
    problems = SweepConfig(grid={"model.n_layer": 4}).problems()
    assert any("grid.model.n_layer must be a non-empty list" in p for p in problems)


def test_length_eval_needs_pretrain():
    problems = SweepConfig(stage="sft", length_eval=[2.0]).problems()
    assert any("length_eval reads a pretraining run folder" in p for p in problems)


def test_every_invalid_point_reported(tmp_path):
    cfg = SweepConfig(out_dir=str(tmp_path), presets=["tiny"],
                      grid={"model.pos_encoding": ["rope", "bogus"], "model.n_embd": [64, 30]})
    with pytest.raises(ValueError) as error:
        check_points(cfg, expand_points(cfg))
    message = str(error.value)

    assert "point n_embd=30,pos_encoding=rope: model.n_embd (30) must be divisible" in message
    assert "point n_embd=64,pos_encoding=bogus: model.pos_encoding: expected one of" in message
    assert "point n_embd=64,pos_encoding=rope" not in message
    assert not any(tmp_path.iterdir())  # nothing ran


def test_unknown_stage_rejected(tmp_path):
    cfg = SweepConfig(out_dir=str(tmp_path), stage="pretrian")
    with pytest.raises(ValueError, match="sweep stage 'pretrian' is not a runnable stage"):
        check_points(cfg, expand_points(cfg))


# ---------------------------------------------------------------------------
# Result columns


def test_metric_columns_final_and_best():
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "val_loss": 4.5, "val_accuracy": 0.3},
               {"step": 3, "loss": 3.5, "val_loss": 4.7, "val_accuracy": 0.4}]
    row = metric_columns(records)

    assert row["final_loss"] == 3.5
    assert row["final_val_loss"] == 4.7
    assert row["best_val_loss"] == 4.5
    assert row["best_val_accuracy"] == 0.4


def test_eval_columns_from_results_list(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": [{"task": "arc_easy", "metric": "acc", "value": 0.31, "stderr": 0.01},
                                            {"task": "lambada", "metric": "ppl", "value": 80.5}]}))
    assert eval_columns(path) == {"eval/arc_easy/acc": 0.31, "eval/lambada/ppl": 80.5}


def test_summarize_stderr_by_hand():
    table = pd.DataFrame({"pos": ["rope"] * 3 + ["alibi"], "T": [64] * 4, "loss": [1.0, 2.0, 3.0, 5.0]})
    summary = summarize(table, ["pos"], "T", "loss", "stderr").set_index("pos")

    # rope: mean 2, sample std 1, three seeds: stderr 1 / sqrt(3).
    assert summary.loc["rope", "mean"] == 2.0
    assert summary.loc["rope", "error"] == pytest.approx(3 ** -0.5)
    assert summary.loc["rope", "n"] == 3
    assert pd.isna(summary.loc["alibi", "error"])


def test_default_group_skips_coupled_columns():
    table = pd.DataFrame({"model.pos_encoding": ["rope", "alibi"] * 2, "model.block_size": [64, 64, 128, 128],
                          "train.batch_size": [16, 16, 8, 8]})
    swept = ["model.pos_encoding", "model.block_size", "train.batch_size"]

    assert default_group(table, swept, "model.block_size") == ["model.pos_encoding"]
    assert default_group(table, swept, "model.pos_encoding") == ["model.block_size", "train.batch_size"]


def test_plot_unknown_column(tmp_path):
    pd.DataFrame({"name": ["a"], "status": ["done"], "lr": [0.1], "run_dir": ["x"], "best_val_loss": [1.0]}).to_csv(
        tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="has no column 'val_loss_2x'"):
        plot(PlotConfig(results=str(tmp_path), y=["val_loss_2x"]))


def test_plot_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results table"):
        plot(PlotConfig(results=str(tmp_path)))


# ---------------------------------------------------------------------------
# End to end on the real corpus


def write_sweep_file(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A finished two-point sweep: rope and alibi, evaluated at twice the training length."""
    if not DATA_DIR:
        pytest.skip("GPTLAB_DATA_DIR is not set; it points to the data kit")
    root = tmp_path_factory.mktemp("sweep")
    config = write_sweep_file(root / "sweep.yaml", stage="pretrain", presets=["tiny"], out_dir=str(root / "out"),
                              base=SMALL_BASE, grid={"model.pos_encoding": ["rope", "alibi"]},
                              length_eval=[2], length_eval_tokens=1024)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main(["sweep", "--config", str(config)]) == 0
    return root / "out"


@needs_data
def test_sweep_table(sweep_dir):
    table = pd.read_csv(sweep_dir / "results.csv")
    from_parquet = pd.read_parquet(sweep_dir / "results.parquet")

    assert table["name"].tolist() == ["pos_encoding=rope", "pos_encoding=alibi"]
    assert table["status"].tolist() == ["done", "done"]
    assert table["model.pos_encoding"].tolist() == ["rope", "alibi"]
    assert (table["tokens_seen"] == 4 * 4 * 32).all()
    for column in ("params", "flops_per_token", "train_flops", "elapsed_s", "tok_per_s", "process_s",
                   "final_val_loss", "best_val_loss", "best_val_bpb", "val_loss_2x", "val_bpb_2x"):
        assert table[column].notna().all(), column
    assert (table["best_val_loss"] <= table["final_val_loss"]).all()
    assert from_parquet["name"].tolist() == table["name"].tolist()


@needs_data
def test_sweep_points_are_run_folders(sweep_dir):
    point = sweep_dir / "pos_encoding=rope"
    settings = yaml.safe_load((point / "sweep_point.yaml").read_text())

    assert (point / "pretrain" / "model.safetensors").is_file()
    assert (point / DONE_FILE).is_file()
    assert "step 4/4" in (point / "sweep.log").read_text()
    assert (point / "tokenizer.json").resolve() == (sweep_dir / "_shared" / "tokenizer.json").resolve()
    assert (point / "tokenizer_meta.json").resolve() == (sweep_dir / "_shared" / "tokenizer_meta.json").resolve()
    assert settings["model.pos_encoding"] == "rope"
    assert json.loads((sweep_dir / "sweep.json").read_text())["swept_keys"] == ["model.pos_encoding"]


@needs_data
def test_plot_writes_figures(sweep_dir, tmp_path):
    written = plot(PlotConfig(results=str(sweep_dir), out_dir=str(tmp_path), y=["best_val_loss", "val_loss_2x"]))

    assert sorted(p.name for p in written) == ["best_val_loss_vs_model.pos_encoding.png", "loss_curves.png",
                                               "val_loss_2x_vs_model.pos_encoding.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_data
def test_sweep_resumes_interrupted_point(sweep_dir, tmp_path):
    """Rerun after one point was cut off mid-run: only that point runs again."""
    out = tmp_path / "out"
    shutil.copytree(sweep_dir, out, symlinks=True)
    finished, interrupted = out / "pos_encoding=rope", out / "pos_encoding=alibi"
    for name in (DONE_FILE, "pretrain/summary.json", "length_eval.json"):
        (interrupted / name).unlink()
    finished_files = {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()}
    config = write_sweep_file(tmp_path / "sweep.yaml", stage="pretrain", presets=["tiny"], out_dir=str(out),
                              base=SMALL_BASE, grid={"model.pos_encoding": ["rope", "alibi"]},
                              length_eval=[2], length_eval_tokens=1024)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main(["sweep", "--config", str(config)]) == 0
    table = pd.read_csv(out / "results.csv")

    assert {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()} == finished_files
    assert (interrupted / DONE_FILE).is_file()
    assert (interrupted / "pretrain" / "summary.json").is_file()
    assert table["status"].tolist() == ["done", "done"]
    assert table["val_loss_2x"].notna().all()


@needs_data
def test_failed_point_does_not_stop_sweep(sweep_dir, tmp_path, capsys):
    checkpoints = [str(sweep_dir / "pos_encoding=rope" / "pretrain"), str(tmp_path / "missing")]
    config = write_sweep_file(tmp_path / "sweep.yaml", stage="sample", out_dir=str(tmp_path / "out"),
                              base={"max_new_tokens": 4, "num_samples": 1, "device": "cpu"},
                              grid={"checkpoint": checkpoints}, point_paths={})

    assert main(["sweep", "--config", str(config)]) == 2
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    failed = json.loads(next((tmp_path / "out").glob(f"*missing*/{FAILED_FILE}")).read_text())

    assert sorted(table["status"]) == ["done", "failed"]
    assert failed["reason"] == "exit status 2"
    assert any("does not exist" in line for line in failed["log_tail"])
    assert "1 of 2 points failed" in capsys.readouterr().err
