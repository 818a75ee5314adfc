"""Plots of a sweep: every run's loss curve on one figure, and metrics against a swept value.

    gptlab plot --results runs/sweep-positions                  # the sweep folder or its table
    gptlab plot --results runs/sweep-positions/results.csv --x model.block_size --y best_val_loss,val_loss_2x

Writes PNG files (matplotlib, Agg backend) to `out_dir` (default: the sweep folder):

- loss_curves.png: `curve_metric` of every run against `curve_x`, read from each run's
  metrics.jsonl. Runs of one variant share a color, and each seed is its own line.
- Y_vs_X.png for every metric Y of `y`: one line per variant (every combination of the
  `group` columns) and one point per value of `x`, at the mean over the seeds. Its error
  bars are one standard error of that mean, std / sqrt(n) with the sample std (n - 1),
  or with `error: std` one sample standard deviation. A point with one seed has no bar.
  A text x (such as pos_encoding) is drawn as categories. Missing values (a metric a run
  does not have, like the 2x length of learned positions) leave a gap.

The swept columns come from the sweep's sweep.json; without one, they are the columns
between "status" and "run_dir" of the table, where `gptlab sweep` puts them. By default
every swept column but x and the seed makes the variants, except a column that x
determines (train.batch_size swept together with model.block_size, for example).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpt.config import option

logger = logging.getLogger(__name__)


@dataclass
class PlotConfig:
    """Configuration of `gptlab plot`."""

    results: str = option("", "a sweep folder (with results.parquet or results.csv) or the path of such a table")
    out_dir: str = option("", "folder for the PNG files; empty for the folder of the table")
    x: str = option("", "column for the x axis (a swept field such as model.block_size, or params, tokens_seen, train_flops, elapsed_s); empty for the first swept column")
    y: list[str] = option(["best_val_loss"], "metric columns to plot against x, one figure each")
    group: list[str] = option([], "columns whose values make one line each; empty for every swept column except x, the seed and columns that x determines")
    error: Literal["stderr", "std"] = option("stderr", "error bars over seeds: standard error of the mean, or sample standard deviation")
    logx: bool = option(False, "logarithmic x axis")
    logy: bool = option(False, "logarithmic y axis")
    curves: bool = option(True, "also draw every run's curve from its metrics.jsonl (loss_curves.png)")
    curve_x: Literal["step", "tokens_seen", "elapsed_s"] = option("step", "x axis of the curves")
    curve_metric: str = option("loss", "metrics.jsonl field drawn as curves: loss (training) or val_loss")

    def problems(self) -> list[str]:
        found = []
        if not self.results:
            found.append("results is required: a sweep folder or its results.csv / results.parquet")
        if not self.y:
            found.append("y must name at least one metric column, for example y=best_val_loss")
        return found


# ---------------------------------------------------------------------------
# Reading the table


def find_table(results: str) -> Path:
    """Return the table a folder or path names: results.parquet, else results.csv.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(results)
    if path.is_file():
        return path
    for name in ("results.parquet", "results.csv"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no results table at {results!r}: expected a results.parquet or results.csv "
                            f"there, as `gptlab sweep` writes them")


def read_table(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def swept_columns(table: Any, folder: Path) -> tuple[list[str], str | None]:
    """Return the swept columns (seed excluded) and the seed column, if any."""
    meta_path = folder / "sweep.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return [c for c in meta["swept_keys"] if c in table.columns], meta.get("seed_field")
    columns = list(table.columns)
    start = columns.index("status") + 1 if "status" in columns else 0
    stop = columns.index("run_dir") if "run_dir" in columns else start
    swept = columns[start:stop]
    seed = next((c for c in swept if c.rsplit(".", 1)[-1] == "seed"), None)
    return [c for c in swept if c != seed], seed


def default_group(table: Any, swept: list[str], x: str) -> list[str]:
    """Pick the swept columns other than x whose value is not fixed by the value of x."""
    group = []
    for column in swept:
        if column == x:
            continue
        values_per_x = table.groupby(x, dropna=False)[column].nunique(dropna=False)
        if (values_per_x > 1).any():
            group.append(column)
    return group


def variant_label(values: tuple, group: list[str]) -> str:
    return ", ".join(f"{column.rsplit('.', 1)[-1]}={value}" for column, value in zip(group, values)) or "all runs"


def file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


# ---------------------------------------------------------------------------
# Figures


def plot_curves(table: Any, group: list[str], metric: str, x: str, out_path: Path) -> Path | None:
    """Draw `metric` against `x` from every run's metrics.jsonl; return the path, or None when no
    run has that metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants: dict[tuple, str] = {}
    drawn = 0
    for _, row in table.iterrows():
        path = Path(str(row.get("run_dir", ""))) / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        points = [(r[x], r[metric]) for r in records if x in r and isinstance(r.get(metric), (int, float))]
        if not points:
            continue
        key = tuple(row[c] for c in group)
        first = key not in variants
        if first:
            variants[key] = colors[len(variants) % len(colors)]
        ax.plot(*zip(*points), color=variants[key], linewidth=1, alpha=0.8,
                marker="o" if len(points) < 20 else None, label=variant_label(key, group) if first else None)
        drawn += 1
    if drawn == 0:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of {drawn} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def summarize(table: Any, group: list[str], x: str, y: str, error: str) -> Any:
    """Compute the mean, error and count of `y` over the seeds of every (variant, x) cell.

    Returns:
        A DataFrame with the group columns, x, "mean", "error" (NaN with one value) and "n".
    """
    import pandas as pd

    data = table[[*group, x]].copy()
    data["value"] = pd.to_numeric(table[y], errors="coerce")
    data = data.dropna(subset=["value"])
    cells = data.groupby([*group, x], dropna=False, sort=True)["value"]
    summary = cells.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    summary["error"] = summary["std"] / summary["n"].pow(0.5) if error == "stderr" else summary["std"]
    return summary


def plot_metric(table: Any, group: list[str], x: str, y: str, cfg: PlotConfig, out_path: Path) -> Path | None:
    """Draw `y` against `x`, one line per variant; return the path, or None when `y` has no values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    summary = summarize(table, group, x, y, cfg.error)
    if summary.empty:
        return None
    numeric_x = pd.api.types.is_numeric_dtype(table[x])
    categories = sorted(table[x].dropna().unique().tolist(), key=str) if not numeric_x else []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    variants = summary.groupby(group, dropna=False, sort=True) if group else [((), summary)]
    for key, cells in variants:
        key = key if isinstance(key, tuple) else (key,)
        cells = cells.sort_values(x)
        xs = cells[x].tolist() if numeric_x else [categories.index(v) for v in cells[x]]
        # Categories have no order, so their points are not joined by a line.
        ax.errorbar(xs, cells["mean"], yerr=cells["error"].fillna(0.0), marker="o", capsize=3,
                    linestyle="-" if numeric_x else "none", label=variant_label(key, group))
    if not numeric_x:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    if cfg.logx and numeric_x:
        ax.set_xscale("log")
    if cfg.logy:
        ax.set_yscale("log")
    seeds = int(summary["n"].max())
    bars = "standard error of the mean" if cfg.error == "stderr" else "sample standard deviation"
    ax.set_title(f"{y} against {x}" + (f" (mean of up to {seeds} seeds, bars: {bars})" if seeds > 1 else ""),
                 fontsize="medium")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if group:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def run(cfg: PlotConfig) -> list[Path]:
    """Run the `plot` stage: write the figures and return their paths.

    Raises:
        FileNotFoundError: no results table at `cfg.results`.
        ValueError: x, a y or a group column is not in the table (the message lists the columns).
    """
    table_path = find_table(cfg.results)
    table = read_table(table_path)
    swept, seed = swept_columns(table, table_path.parent)
    x = cfg.x or (swept[0] if swept else "params")
    missing = [c for c in [x, *cfg.y, *cfg.group] if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path} has no column {', '.join(map(repr, missing))}; its columns are "
                         f"{', '.join(table.columns)}")
    group = list(cfg.group) if cfg.group else default_group(table, [c for c in swept if c != seed], x)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else table_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    if cfg.curves and "run_dir" in table.columns:
        curves = plot_curves(table, [c for c in swept if c != seed], cfg.curve_metric, cfg.curve_x,
                             out_dir / "loss_curves.png")
        if curves is None:
            logger.warning("no run of %s has %r in its metrics.jsonl, so there are no curves", table_path,
                           cfg.curve_metric)
        else:
            written.append(curves)
    for y in cfg.y:
        path = plot_metric(table, group, x, y, cfg, out_dir / f"{file_name(y)}_vs_{file_name(x)}.png")
        if path is None:
            logger.warning("column %r has no numeric values in %s; no figure for it", y, table_path)
        else:
            written.append(path)
    for path in written:
        logger.info("wrote %s", path)
    return written
