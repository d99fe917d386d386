"""The backends on a real local Ray (2 CPUs): worker death, user errors inside workers, reporting
hooks, a stage inside a Tune trial. (Two DDP workers on disjoint shards: test_two_nodes.)"""
import os
from dataclasses import replace

import pytest

from raysslvit.__main__ import main
from raysslvit.backend_ray import WorkerGroup
from raysslvit.config import build_config
from raysslvit.errors import UserError
from raysslvit.stages import STAGES, run_command, run_stage

from nodes import why_not


def same_run(a: dict, b: dict) -> bool:
    """Equal final metrics and per-epoch history, but for wall times."""
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s") and k not in ("history", "timing")}
    return untimed(a) == untimed(b) and [untimed(h) for h in a["history"]] == [untimed(h) for h in b["history"]]


def stops_after(epoch: int, marker: str = ""):
    """The SSL stage, stopped right after reporting `epoch`: with a marker file, its rank-0 worker
    process exits, once; without, it raises (the run ends there, its checkpoint kept)."""
    worker = STAGES["ssl"].worker

    def stopping(job, ctx, report, resume):
        def report_then_stop(metrics, state):
            report(metrics, state)
            if metrics["epoch"] == epoch and ctx.rank == 0 and not (marker and os.path.exists(marker)):
                if not marker:  # a builtin: Ray's processes cannot import this test module
                    raise RuntimeError(f"stopped after epoch {epoch}")
                open(marker, "w").close()
                os._exit(1)

        return worker(job, ctx, report_then_stop, resume)

    return replace(STAGES["ssl"], worker=stopping)


def failing_worker(calls):
    """A worker that counts its calls in a file and meets a user error (the data went away)."""

    def worker(job, ctx, report, resume):
        with open(calls, "a") as f:
            f.write("x")
        raise UserError("the data went away")

    return worker


@pytest.mark.skipif(why_not() is None, reason="where the two nodes run, their study test's one-node reference "
                                              "restarts a dead worker and meets a user error (test_two_nodes)")
def test_a_dead_worker_restarts_from_its_checkpoint_and_a_user_error_is_not_retried(tmp_path, ray_local, capfd):
    """On one worker group: a worker that dies is restarted and handed the last checkpoint, as a new
    run is (test_rundir), and its run ends with the same fit as in-process (torch is seeded from the
    config before a stage builds its model); then a user error on a worker ends its job at once, once."""
    cfg = build_config("smoke", {"out": str(tmp_path / "harmed"), "ssl.epochs": 3, "max_failures": 1})
    group, calls = WorkerGroup(cfg), tmp_path / "calls"
    try:
        harmed = run_stage(stops_after(2, str(tmp_path / "died-once")), cfg, group=group)
        assert os.path.exists(tmp_path / "died-once")  # it did die, and its restart went on
        assert "ssl: a worker died; Ray Train restarted the group: resuming" in capfd.readouterr().out
        with pytest.raises(UserError, match="^the data went away$"):
            run_stage(replace(STAGES["ssl"], worker=failing_worker(calls)), replace(cfg, out=str(tmp_path / "failed")),
                      group=group)
    finally:
        group.close(force=True)
    assert calls.read_text() == "x" and not (tmp_path / "failed" / "ssl" / "metrics.json").exists()
    assert "Traceback" not in capfd.readouterr().err
    unharmed = run_command("ssl", replace(cfg, out=str(tmp_path / "unharmed"), launcher="local"))
    assert same_run(harmed, unharmed)


def test_a_user_error_inside_a_worker_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls"
    monkeypatch.setitem(STAGES, "ssl", replace(STAGES["ssl"], worker=failing_worker(calls)))
    assert main(["ssl", "--out", str(tmp_path / "out"), "--launcher", "local"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["raysslvit: error: the data went away"]
    assert calls.read_text() == "x" and not (tmp_path / "out" / "ssl" / "metrics.json").exists()


def test_every_epoch_reaches_on_epoch(tmp_path):
    seen = []
    cfg = build_config("smoke", {"out": str(tmp_path), "ssl.epochs": 3, "launcher": "local"})
    final = run_command("ssl", cfg, on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3] and seen[-1]["val_rotation_acc"] == final["val_rotation_acc"]


def test_a_stage_inside_a_tune_trial_takes_only_what_is_free(tmp_path, ray_local):
    """The trial holds one of the two CPUs; its TorchTrainer worker gets the other (sizing from the
    whole cluster would wait forever), and Tune sees every epoch through TuneReportCallback (a Ray
    Train callback: the stage hands its callbacks to its TorchTrainer). With --mlflow, the stage's
    rank 0 logs its run through Ray's setup_mlflow."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from test_tracking import curve, mlflow_runs

    cfg = build_config("smoke", {"out": str(tmp_path / "out"), "ssl.epochs": 3, "mlflow": str(tmp_path / "mlruns")})

    def trial(config):
        final = run_command("ssl", cfg, callbacks=[TuneReportCallback()])
        tune.report({"final_val_rotation_acc": final["val_rotation_acc"]})

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="trial"))
    result = tuner.fit()[0]
    assert result.error is None, result.error
    epochs = result.metrics_dataframe.dropna(subset=["epoch"])
    assert list(epochs["epoch"]) == [1, 2, 3]
    assert epochs["val_rotation_acc"].iloc[-1] == result.metrics["final_val_rotation_acc"]
    (run,), client = mlflow_runs(tmp_path / "mlruns")
    assert run.info.run_name == "ssl" and run.info.status == "FINISHED" and run.data.params["ssl.epochs"] == "3"
    assert curve(client, run, "val_rotation_acc") == list(zip([1, 2, 3], epochs["val_rotation_acc"]))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.pt", "metrics.json", "config.json"}
