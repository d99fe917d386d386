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
    """A study's table (one row per trial) from its folder or its results.parquet, or the trials of
    several studies of the same fields, their paths joined with os.pathsep (a follow-up study's
    beside the first's); `df.attrs["swept"]` names the swept config fields (e.g. ["ssl.mask_ratio"])."""
    tables = []
    for one in path.split(os.pathsep):
        table = one if one.endswith(".parquet") else os.path.join(one, "results.parquet")
        if not os.path.isfile(table):
            raise UserError(f"no study results at {table} (run `python -m raysslvit.tune --space NAME` first)")
        tables.append(pd.read_parquet(table))
    swept = [list(t.columns[:list(t.columns).index("seed")]) for t in tables]
    if any(s != swept[0] for s in swept):
        raise UserError(f"these studies sweep different fields ({' / '.join(', '.join(s) for s in swept)}): "
                        f"one table cannot hold them")
    df = pd.concat(tables, ignore_index=True)
    df.attrs["swept"] = swept[0]
    return df


def summarise(df: pd.DataFrame, figures: list[str]) -> pd.DataFrame:
    """Mean, std and count over seeds of each figure, per point of the swept fields (finished trials)."""
    done = df[df["status"] == "finished"]
    return done.groupby(df.attrs["swept"])[figures].agg(["mean", "std", "count"])


def plot_study(df: pd.DataFrame, val: str, test: str, path: str, title: str = "") -> Figure:
    """Val and test figures side by side against the first swept field, mean ± std over seeds; one
    line pair per value of a second swept field, if any."""
    x, *rest = df.attrs["swept"]
    stats = summarise(df, [val, test]).reset_index()
    groups = stats.groupby(rest[0]) if rest else [(None, stats)]
    fig = Figure(figsize=(6.5, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, (val, test)):
        for key, g in groups:
            ax.errorbar(g[x], g[(name, "mean")], yerr=g[(name, "std")].fillna(0), marker="o", capsize=4,
                        label=None if key is None else f"{rest[0]} = {key}")
        ax.set_xlabel(x)
        ax.set_xticks(sorted(stats[x].unique()))
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("accuracy")
    if rest:
        axes[1].legend(fontsize=8)
    n = int(stats[(val, "count")].max()) if len(stats) else 0
    fig.suptitle(title or f"against {x} ({n} seed{'s' if n != 1 else ''} per point: mean ± std)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig
