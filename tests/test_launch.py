"""The backends on a real local Ray (2 CPUs): worker death, user errors inside workers, reporting
hooks, a stage inside a Tune trial, and two DDP workers on disjoint shards."""
import os
from dataclasses import replace

import pytest

from raysslvit.__main__ import main
from raysslvit.config import build_config
from raysslvit.errors import UserError
from raysslvit.launch import FAIL_AT_EPOCH
from raysslvit.stages import finetune, ssl, video



def same_run(a: dict, b: dict) -> bool:
    """Equal final metrics and per-epoch history, but for wall times."""
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s") and k not in ("history", "timing")}
    return untimed(a) == untimed(b) and [untimed(h) for h in a["history"]] == [untimed(h) for h in b["history"]]


def test_a_dead_worker_restarts_and_a_new_run_resumes_from_its_checkpoint(tmp_path, ray_local, monkeypatch, capsys):
    cfg = build_config("smoke", {"out": str(tmp_path / "harmed"), "ssl.epochs": 3, "max_failures": 1})
    monkeypatch.setenv(FAIL_AT_EPOCH, "2")
    harmed = ssl.run(cfg)
    monkeypatch.delenv(FAIL_AT_EPOCH)
    assert os.path.exists(tmp_path / "harmed" / "ssl" / "checkpoints" / "failed-at-2")  # it did die
    unharmed = ssl.run(replace(cfg, out=str(tmp_path / "unharmed")))
    assert same_run(harmed, unharmed)
    # a run that ended after epoch 2 (no retries left) is resumed by the next call from its folder
    stopped = replace(cfg, out=str(tmp_path / "stopped"), max_failures=0)
    monkeypatch.setenv(FAIL_AT_EPOCH, "2")
    with pytest.raises(Exception):
        ssl.run(stopped)
    monkeypatch.delenv(FAIL_AT_EPOCH)
    capsys.readouterr()
    resumed = ssl.run(stopped)
    assert same_run(resumed, unharmed) and resumed["timing"]["resumed_after_epoch"] == 2
    assert "ssl: starting (Ray Train, 1 worker(s), resuming)" in capsys.readouterr().out


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_a_user_error_inside_a_worker_is_one_line_and_not_retried(tmp_path, launcher, ray_local, monkeypatch, capsys):
    calls = tmp_path / "calls"

    def worker(cfg, ctx, report, resume):
        with open(calls, "a") as f:
            f.write("x")
        raise UserError("the data went away")

    monkeypatch.setattr(ssl, "worker", worker)
    assert main(["ssl", "--out", str(tmp_path / "out"), "--launcher", launcher, "--max-failures", "2"]) == 2
    err = capsys.readouterr().err  # beside the Ray's own log lines (the fixture's Ray has no dashboard)
    assert [l for l in err.splitlines() if "raysslvit" in l] == ["raysslvit: error: the data went away"]
    assert "Traceback" not in err
    assert calls.read_text() == "x"
    assert not (tmp_path / "out" / "ssl" / "metrics.json").exists()


def test_every_epoch_reaches_on_epoch_and_ray_train_callbacks(tmp_path, ray_local):
    from ray.train import UserCallback

    seen_file = tmp_path / "seen"

    class Record(UserCallback):  # runs in Ray Train's controller: it writes what it sees to a file
        def after_report(self, run_context, metrics, checkpoint):
            with open(seen_file, "a") as f:
                f.write(f"{metrics[0]['epoch']} {metrics[0]['val_rotation_acc']}\n")

    cfg = build_config("smoke", {"out": str(tmp_path / "ray"), "ssl.epochs": 3})
    final = ssl.run(cfg, callbacks=[Record()])
    rows = [line.split() for line in seen_file.read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3] and float(rows[-1][1]) == final["val_rotation_acc"]
    seen = []
    ssl.run(replace(cfg, out=str(tmp_path / "local"), launcher="local"), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3] and all("val_rotation_acc" in m for m in seen)


def test_a_stage_inside_a_tune_trial_takes_only_what_is_free(tmp_path, ray_local):
    """The trial holds one of the two CPUs; its TorchTrainer worker gets the other (sizing from the
    whole cluster would wait forever), and Tune sees every epoch through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = build_config("smoke", {"out": str(tmp_path / "out"), "ssl.epochs": 3})

    def trial(config):
        ssl.run(cfg, callbacks=[TuneReportCallback()])

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="trial"))
    result = tuner.fit()[0]
    assert result.error is None, result.error
    assert list(result.metrics_dataframe["epoch"]) == [1, 2, 3]


def test_two_workers_train_on_disjoint_shards(tmp_path, ray_local):
    """SSL with two workers runs in test_two_nodes; here M comes from one in-process epoch."""
    base = {"out": str(tmp_path), "num_workers": 2, "finetune.epochs": 1, "video.epochs": 1}
    ssl.run(build_config("smoke", {"out": str(tmp_path), "launcher": "local", "ssl.epochs": 1}))
    ft = finetune.run(build_config("smoke", base))
    assert ft["history"][0]["train_images"] == 2250 and ft["history"][0]["train_images_repeated"] == 0
    for change in ({"video.st_blocks": 1}, {"video.st_blocks": 2}, {"video.temporal": "mean"}):
        v = video.run(build_config("smoke", {**base, **change}))
        # 225 images per class: 14 clips of 16 each, 140 clips dealt to 2 ranks
        assert v["history"][0]["train_images"] == 140 * 16 and v["history"][0]["train_images_repeated"] == 0
        assert 0 <= v["test_acc"] <= 1
