"""The study command's report: results.json's stable keys, report.html self-contained (every figure
inlined), report.md, rebuilt from disk by `report`; --stages and --seeds."""
import json
import os
from html.parser import HTMLParser

import pytest

from raysslvit import report
from raysslvit.__main__ import main
from raysslvit.artifacts import read_json, write_json
from raysslvit.errors import UserError
from raysslvit.stages import study_steps

KEYS = ("ssl", "probe", "finetune", "analyze", "video_1", "video_2", "video_mean", "infonce_probe")


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        self.tables += tag == "table"


def test_the_study_leaves_a_report(smoke_run):
    results = read_json(smoke_run / "results.json")
    for key in KEYS:
        assert "history" not in results[key] and results[key], key
    probe = read_json(smoke_run / "probe" / "metrics.json")
    assert results["probe"]["test_acc_cls"] == probe["test_acc_cls"] and "cka_before" in results["analyze"]
    assert set(results["skipped"]) == {"captions", "fusion"}  # no BLIP / CLIP weights on a test machine
    page = Images()
    page.feed((smoke_run / "report.html").read_text())
    assert len(page.sources) == 4 and page.tables >= 3  # maps, tokens, CKA, training curves; results, analysis, times
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in page.sources)
    md = (smoke_run / "report.md").read_text()
    assert f"| linear probe of M, final CLS (the study's protocol) | {probe['test_acc_cls']:.4f} | 0.3851 |" in md
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            assert (smoke_run / line.split("](")[1].rstrip(")")).exists(), line


def test_report_rebuilds_from_disk(smoke_run, capsys):
    os.remove(smoke_run / "report.html")
    assert main(["report", "--out", str(smoke_run)]) == 0
    assert (smoke_run / "report.html").exists() and "report.html" in capsys.readouterr().out


def test_stages_bring_their_prerequisites():
    assert study_steps("fusion") == ["ssl", "video_2", "captions", "fusion"]
    assert study_steps("analyze,probe") == ["ssl", "probe", "finetune", "analyze"]
    assert len(study_steps("")) == 11
    with pytest.raises(UserError, match="unknown stage 'videos'"):
        study_steps("videos")


def test_seeds_are_aggregated(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        folder = tmp_path / f"seed_{seed}" / "finetune"
        folder.mkdir(parents=True)
        write_json(folder / "metrics.json", {"test_acc": acc, "history": [{"epoch": 1, "val_acc": acc, "train_loss": 1.0}],
                                             "timing": {"wall_s": 10.0}})
        write_json(folder / "config.json", {"config": {"preset": "smoke"}, "seed": seed})
    results = report.build(str(tmp_path))
    assert results["seeds"] == [0, 1]
    assert results["finetune"]["test_acc"] == pytest.approx(0.6) and results["finetune"]["test_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert "0.6000 ± 0.1414" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["finetune"]["per_seed"]["1"]["test_acc"] == 0.7


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
