"""The study notebooks run (nbclient) on a real smoke study and write their figures."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from raysslvit.analysis import load_study, summarise
from raysslvit.errors import UserError

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "analysis")


def test_load_study_names_the_swept_fields(tune_study, tmp_path):
    df = load_study(str(tune_study["path"]))
    assert df.attrs["swept"] == ["model.depth"] and len(df) == 3
    stats = summarise(df, ["probe.val_acc", "probe.test_acc"])
    assert list(stats.index) == [1, 2, 3] and (stats[("probe.val_acc", "count")] == 1).all()
    with pytest.raises(UserError, match="no study results"):
        load_study(str(tmp_path))
    both = load_study(os.pathsep.join([str(tune_study["path"])] * 2))  # a follow-up study beside the first
    assert both.attrs["swept"] == ["model.depth"] and len(both) == 6
    df.rename(columns={"model.depth": "ssl.mask_ratio"}).to_parquet(other := tmp_path / "other.parquet")
    with pytest.raises(UserError, match="^these studies sweep different fields"):
        load_study(os.pathsep.join([str(tune_study["path"]), str(other)]))


@pytest.mark.parametrize("name", sorted(f[:-6] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")))
def test_every_notebook_renders_its_figure(name, tune_study, monkeypatch):
    """Every notebook is generic over the swept field, so the one small study serves them all."""
    monkeypatch.setenv("RAYSSLVIT_STUDY", str(tune_study["path"]))
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    src = "\n".join(c.source for c in nb.cells)
    metrics = [m for m in ("probe", "video") if f'"{m}.val_acc"' in src]
    if metrics != ["probe"]:  # the st_blocks notebook plots video figures: give it the probe's here
        nb.cells[1].source = nb.cells[1].source.replace('"video.val_acc", "video.test_acc"', '"probe.val_acc", "probe.test_acc"')
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    assert os.path.getsize(tune_study["path"] / f"{name}.png") > 1000
    assert any(o.get("output_type") == "execute_result" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
