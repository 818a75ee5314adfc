"""Plots of a sweep: every run's loss curve on one figure, and metrics against a swept value.

    gptlab plot --results runs/sweep-positions                  # the sweep folder or its table
    gptlab plot --results runs/sweep-positions/results.csv --x model.block_size --y best_val_loss,val_loss_2x

Writes PNG files (matplotlib, Agg backend) to `out_dir` (default: the sweep folder):

- loss_curves.png: `curve_metric` of every run against `curve_x`, read from each run's
  metrics.jsonl and optionally smoothed by a trailing moving average (`curve_smooth`).
  Each variant of `group` has the color it has in the other figures, each value of x
  (when x is swept) a line style, and each seed is its own line.
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
import math
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
    curve_smooth: int = option(1, "trailing moving average over this many records of each curve, 1 for none")

    def problems(self) -> list[str]:
        found = []
        if not self.results:
            found.append("results is required: a sweep folder or its results.csv / results.parquet")
        if not self.y:
            found.append("y must name at least one metric column, for example y=best_val_loss")
        if self.curve_smooth < 1:
            found.append(f"curve_smooth must be 1 (no smoothing) or more, got {self.curve_smooth}")
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


def variant_key(values: Any) -> tuple:
    """Make a hashable key of a variant's values; NaN becomes None, because NaN != NaN."""
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in values)


def variant_colors(table: Any, group: list[str]) -> dict[tuple, str]:
    """Give every variant (a combination of the group columns' values) one color, the same in every figure."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({variant_key(row) for row in table[group].itertuples(index=False)}, key=str)
    return {key: colors[i % len(colors)] for i, key in enumerate(keys)}


def variant_label(values: tuple, group: list[str]) -> str:
    return ", ".join(f"{column.rsplit('.', 1)[-1]}={value}" for column, value in zip(group, values)) or "all runs"


def file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


# ---------------------------------------------------------------------------
# Figures


def moving_average(values: list[float], window: int) -> list[float]:
    """Average each value with the up to window - 1 values before it."""
    totals = [0.0]
    for value in values:
        totals.append(totals[-1] + value)
    return [(totals[i + 1] - totals[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_curves(table: Any, group: list[str], style_columns: list[str], colors: dict[tuple, str],
                cfg: PlotConfig, out_path: Path) -> Path | None:
    """Draw `cfg.curve_metric` against `cfg.curve_x` from every run's metrics.jsonl, colored by
    `group` and styled by `style_columns`; return the path, or None when no run has that metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, x = cfg.curve_metric, cfg.curve_x
    variant_columns = group + style_columns
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    style_of: dict[tuple, str] = {}
    labelled: set[tuple] = set()
    drawn = 0
    for _, row in table.iterrows():
        path = Path(str(row.get("run_dir", ""))) / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        points = [(r[x], r[metric]) for r in records if x in r and isinstance(r.get(metric), (int, float))]
        if not points:
            continue
        xs, ys = zip(*points)
        key = variant_key(row[c] for c in variant_columns)
        style = style_of.setdefault(key[len(group):], styles[len(style_of) % len(styles)])
        ax.plot(xs, moving_average(list(ys), cfg.curve_smooth), color=colors[key[:len(group)]], linestyle=style,
                linewidth=1,
                alpha=0.8, marker="o" if len(points) < 20 else None,
                label=None if key in labelled else variant_label(key, variant_columns))
        labelled.add(key)
        drawn += 1
    if drawn == 0:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    smoothing = f", moving average of {cfg.curve_smooth} records" if cfg.curve_smooth > 1 else ""
    ax.set_title(f"{metric} of {drawn} runs{smoothing}")
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


def plot_metric(table: Any, group: list[str], x: str, y: str, colors: dict[tuple, str], cfg: PlotConfig,
                out_path: Path) -> Path | None:
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
        key = variant_key(key if isinstance(key, tuple) else (key,))
        cells = cells.sort_values(x)
        xs = cells[x].tolist() if numeric_x else [categories.index(v) for v in cells[x]]
        # Categories have no order, so their points are not joined by a line.
        ax.errorbar(xs, cells["mean"], yerr=cells["error"].fillna(0.0), marker="o", capsize=3, color=colors[key],
                    linestyle="-" if numeric_x else "none", label=variant_label(key, group))
    if not numeric_x:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    if cfg.logx and numeric_x:
        ax.set_xscale("log")
    if cfg.logy:
        ax.set_yscale("log")
    seeds = int(summary["n"].max())
    bars = "standard error of the mean" if cfg.error == "stderr" else "sample standard deviation"
    title = f"{y} against {x}"
    if seeds > 1:
        title += f"\nmean of up to {seeds} seeds; error bars: one {bars}"
    ax.set_title(title, fontsize="medium")
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

    colors = variant_colors(table, group)
    written = []
    if cfg.curves and "run_dir" in table.columns:
        style_columns = [x] if x in swept else []
        curves = plot_curves(table, group, style_columns, colors, cfg, out_dir / "loss_curves.png")
        if curves is None:
            logger.warning("no run of %s has %r in its metrics.jsonl, so there are no curves", table_path,
                           cfg.curve_metric)
        else:
            written.append(curves)
    for y in cfg.y:
        path = plot_metric(table, group, x, y, colors, cfg, out_dir / f"{file_name(y)}_vs_{file_name(x)}.png")
        if path is None:
            logger.warning("column %r has no numeric values in %s; no figure for it", y, table_path)
        else:
            written.append(path)
    for path in written:
        logger.info("wrote %s", path)
    return written
