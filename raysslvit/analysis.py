"""Ray Tune studies in pandas: `load_study(path)` and the figure every study notebook draws."""
from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure

from raysslvit.artifacts import atomic_path
from raysslvit.errors import UserError

# Columns of a results table that are not swept config fields.
RESULT_COLUMNS = {"seed", "trial", "status", "epochs_reported", "wall_time_s"}


def load_study(path: str) -> pd.DataFrame:
    """A study's table (one row per trial) from its folder or its results.parquet; `df.attrs["swept"]`
    names the swept config fields (e.g. ["ssl.mask_ratio"])."""
    table = path if path.endswith(".parquet") else os.path.join(path, "results.parquet")
    if not os.path.isfile(table):
        raise UserError(f"no study results at {table} (run `python -m raysslvit.tune --space NAME` first)")
    df = pd.read_parquet(table)
    df.attrs["swept"] = list(df.columns[:list(df.columns).index("seed")])
    return df


def summarise(df: pd.DataFrame, figures: list[str]) -> pd.DataFrame:
    """Mean, std and count over seeds of each figure, per point of the swept fields (finished trials)."""
    done = df[df["status"] == "finished"]
    return done.groupby(df.attrs["swept"])[figures].agg(["mean", "std", "count"])


def plot_study(df: pd.DataFrame, val: str, test: str, path: str, title: str = "") -> Figure:
    """Val and test figures side by side against the (first) swept field, mean ± std over seeds."""
    x = df.attrs["swept"][0]
    stats = summarise(df, [val, test]).reset_index()
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, offset in ((val, -0.01), (test, 0.01)):
        ax.errorbar(stats[x] + offset * (stats[x].max() - stats[x].min() or 1), stats[(name, "mean")],
                    yerr=stats[(name, "std")].fillna(0), marker="o", capsize=4, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel("accuracy")
    ax.set_xticks(stats[x])
    n = int(stats[(val, "count")].max()) if len(stats) else 0
    ax.set_title(title or f"{val} and {test} against {x} ({n} seed{'s' if n != 1 else ''} per point)", fontsize=9)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig
