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

KEYS = ("ssl", "probe", "probe_random", "finetune", "scratch", "analyze", "video_1", "video_2", "video_mean", "infonce_probe")


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
    control = read_json(smoke_run / "probe_random" / "metrics.json")["test_acc_cls"]
    gain = results["ssl_gain"]["probe.test_acc_cls"]
    assert gain["gain"] == pytest.approx(probe["test_acc_cls"] - control) and not gain["established"]  # one seed
    assert (f"| linear probe of M, final CLS (the study's protocol) | {probe['test_acc_cls']:.4f} | "
            f"{control:.4f} (probe_random) | {gain['gain']:+.4f} (not established) |") in md
    scratch = read_json(smoke_run / "scratch" / "metrics.json")["test_acc"]
    assert f"| fine-tuning | {results['finetune']['test_acc']:.4f} | {scratch:.4f} (scratch) |" in md
    # the embedded sample is a plumbing check: the study's figures are left out, not set beside ours
    assert not results["full_cifar10"] and "Plumbing check" in md and "0.3851" not in md and "| the study |" not in md
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
    assert study_steps("scratch,probe_random") == ["probe_random", "scratch"]  # random weights need no M
    assert len(study_steps("")) == 13
    with pytest.raises(UserError, match="unknown stage 'videos'"):
        study_steps("videos")


def _stage(folder, acc: float, seed: int, sizes: dict, commit: str = "a" * 40) -> None:
    folder.mkdir(parents=True)
    write_json(folder / "metrics.json", {"test_acc": acc, "history": [{"epoch": 1, "val_acc": acc, "train_loss": 1.0}],
                                         "timing": {"wall_s": 10.0}})
    write_json(folder / "config.json", {"config": {"preset": "smoke"}, "seed": seed, "data_sizes": sizes, "git_commit": commit})


CIFAR10 = {"train": 45000, "val": 5000, "test": 10000, "classes": 10}


def test_seeds_are_aggregated_and_a_gain_within_two_std_is_not_established(tmp_path):
    # fine-tuning beats scratch by 0.10 and 0.12 (established); the probe beats its control by 0.10 and -0.02 (not)
    for seed, (ft, scratch, probe, random) in enumerate([(0.5, 0.4, 0.5, 0.4), (0.7, 0.58, 0.5, 0.52)]):
        for stage, acc in (("finetune", ft), ("scratch", scratch), ("probe", probe), ("probe_random", random)):
            _stage(tmp_path / f"seed_{seed}" / stage, acc, seed, CIFAR10, commit=str(seed) * 40)
        write_json(tmp_path / f"seed_{seed}" / "study.json", {"wall_s": 40.0 + seed, "skipped": {}})
    results = report.build(str(tmp_path))
    assert results["seeds"] == [0, 1] and results["full_cifar10"]
    assert results["finetune"]["test_acc"] == pytest.approx(0.6) and results["finetune"]["test_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    md = (tmp_path / "report.md").read_text()
    assert "| fine-tuning | 0.6000 ± 0.1414 | 0.4900 ± 0.1273 (scratch) | +0.1100 ± 0.0141 | 0.4029 |" in md
    assert "| linear probe of the InfoNCE baseline, final CLS | — | — | — | 0.4008 |" in md  # not run: no control either
    gains = results["ssl_gain"]
    assert gains["finetune.test_acc"]["established"] and gains["finetune.test_acc"]["per_seed"]["1"] == pytest.approx(0.12)
    assert not gains["probe.test_acc"]["established"] and "+0.0400 ± 0.0849 (not established)" in md
    assert "| fine-tuning | 0.5000 | 0.7000 |" in md and "| control scratch, test_acc | 0.4000 | 0.5800 |" in md  # every seed
    assert "Plumbing check" not in md and "Plumbing check" not in report.summary(results)
    # the seeds were run at different commits, each in its own last call: the header names every one
    assert results["provenance"]["git_commits"]["1" * 40] == [f"seed_1/{s}" for s in ("finetune", "probe", "probe_random", "scratch")]
    assert "Commits 0000000 (seed_0: finetune, probe, probe_random, scratch); 1111111 (seed_1: " in md
    assert "(each seed's last run call: seed 0 40 s, seed 1 41 s)" in md
    assert json.loads((tmp_path / "results.json").read_text())["finetune"]["per_seed"]["1"]["test_acc"] == 0.7


def test_data_other_than_full_cifar10_is_a_plumbing_check_without_the_studys_figures(tmp_path):
    _stage(tmp_path / "finetune", 0.5, 0, {**CIFAR10, "train": 4500})
    results = report.build(str(tmp_path))
    console = report.summary(results)
    assert "Plumbing check: these stages saw 4500 train / 5000 val" in console and "0.4029" not in console
    assert "| the study |" not in (tmp_path / "report.md").read_text()


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
