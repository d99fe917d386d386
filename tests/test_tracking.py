"""Tracking: TensorBoard event files of every trained stage, MLflow runs from both launchers and
from Tune trials (real local stores, read back with TensorBoard's and MLflow's own readers)."""
import os

import pytest

from raysslvit.artifacts import read_json
from raysslvit.stages import STAGES

TRAINED = [key for key, s in STAGES.items() if s.worker is not None]


def mlflow_runs(store, experiment="raysslvit"):
    import mlflow

    from raysslvit.tracking import allow_file_store

    allow_file_store()
    mlflow.set_tracking_uri(f"file://{store}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list"), mlflow.MlflowClient()


def curve(client, run, key):
    return [(m.step, pytest.approx(m.value)) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                               key=lambda m: m.step)]


def test_event_files_hold_every_epoch_of_every_trained_stage(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = [key for key in TRAINED if (smoke_run / STAGES[key].folder / "metrics.json").exists()]
    assert {"ssl", "probe", "finetune", "video_2"} <= set(done)
    for key in done:
        metrics = read_json(smoke_run / STAGES[key].folder / "metrics.json")
        events = EventAccumulator(str(smoke_run / STAGES[key].folder / "tensorboard"))
        events.Reload()
        history = metrics.get("history") or [metrics]
        monitor = STAGES[key].monitor or "val_acc"
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(monitor.replace("_", "/", 1))] == [
            (row["epoch"], row[monitor]) for row in history], key
        for k in (k for k in metrics if k.startswith("test_") and isinstance(metrics[k], float)):
            assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(k.replace("_", "/", 1))] == [
                (metrics["epoch"], metrics[k])], (key, k)
        if "lr" in history[0]:  # probes have no schedule
            assert len(events.Scalars("lr")) == len(history), key


def test_a_study_is_one_mlflow_run_with_a_run_per_stage(smoke_run, smoke_mlflow):
    runs, client = mlflow_runs(smoke_mlflow)
    parent = next(r for r in runs if r.info.run_name.startswith("study"))
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    done = {STAGES[k].folder for k in TRAINED if (smoke_run / STAGES[k].folder / "metrics.json").exists()}
    assert set(stages) == done and len(runs) == len(done) + 1
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "report.md", "results.json"}
    for name, run in stages.items():
        metrics = read_json(smoke_run / name / "metrics.json")
        assert run.info.status == "FINISHED" and run.data.params["seed"] == "0", name
        assert {"model.pt", "metrics.json", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        monitor = next(s.monitor for s in STAGES.values() if s.folder == name) or "val_acc"
        assert curve(client, run, monitor) == [(row["epoch"], row[monitor]) for row in metrics.get("history") or [metrics]]
        assert {k: pytest.approx(v) for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)} == {
            k: v for k, v in run.data.metrics.items() if k.startswith("test_")}, name


def test_a_folder_store_is_refused_on_several_nodes():
    """Workers on another node cannot reach the driver's mlruns/: one line before any worker starts."""
    from raysslvit.errors import UserError
    from raysslvit.tracking import check_nodes, tracking_uri

    check_nodes("mlruns", 1)
    check_nodes("http://127.0.0.1:5000", 2)
    with pytest.raises(UserError, match="--mlflow needs a tracking server"):
        check_nodes("mlruns", 2)
    assert tracking_uri("mlruns") == "file://" + os.path.abspath("mlruns")
