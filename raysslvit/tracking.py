"""Experiment tracking: TensorBoard event files in every trained stage's folder (on by default) and
MLflow runs behind `--mlflow [URI]` (a local `mlruns/` store, or a tracking server).

TensorBoard is written on the driver from rank 0's reports, the run folder's one writer (a worker
may sit on a machine that shares no disk with it). MLflow: rank 0 of each trained stage opens the
stage's run through Ray's `setup_mlflow` (or MLflow itself in-process, where Ray may be missing),
logs the config and every epoch, and the driver adds the final artifacts to it; a study's stages
are nested under one parent run; Tune studies log through Ray's `MLflowLoggerCallback`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid

from raysslvit.errors import UserError

EVENTS = "tensorboard"  # <stage>/tensorboard/: `tensorboard --logdir runs/` shows the stages side by side
EXPERIMENT = "raysslvit"
_study_run: dict = {}  # the open parent run of `run`, on the driver


def numbers(metrics: dict) -> dict:
    """A metrics dict's numbers (not the history, the timing or a flag)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def scalars(metrics: dict) -> dict[str, float]:
    """A report's numbers as a tracker logs them (not the epoch counter: it is the step)."""
    return {k: float(v) for k, v in numbers(metrics).items() if k != "epoch"}


def tag(key: str) -> str:
    """`val_acc` -> `val/acc`: TensorBoard groups a split's curves in one section."""
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if head in ("train", "val", "test") and rest else key


def new_points(metrics: dict, written: set) -> list[tuple[int, dict]]:
    """(step, figures) of a report not yet written: an epoch's train and val figures; from the final
    report (it carries the test figures), the epochs only its history holds, then the test figures
    at its epoch (its val figures repeat the best epoch's)."""
    points = []
    for row in metrics.get("history") or [metrics]:
        if row["epoch"] not in written:
            written.add(row["epoch"])
            points.append((row["epoch"], {k: v for k, v in scalars(row).items() if not k.startswith("test_")}))
    if any(k.startswith("test_") for k in metrics):
        points.append((metrics["epoch"], {k: v for k, v in scalars(metrics).items()
                                          if k.startswith("test_") or k == "best_val_epoch"}))
    return points


class EventLog:
    """A trained stage's TensorBoard events, each epoch as it is reported."""

    def __init__(self, folder: str, resumed_after: int | None):
        self.path = os.path.join(folder, EVENTS)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # a machine without Ray's extras (the GPU machine): no event files
            self.writer = None
            return
        if resumed_after is None:  # a run from epoch 1: older events belong to another run
            shutil.rmtree(self.path, ignore_errors=True)
        self.writer, self.written = SummaryWriter(self.path), set(range(1, (resumed_after or 0) + 1))

    def epoch(self, metrics: dict) -> None:
        if self.writer is None:
            return
        for step, figures in new_points(metrics, self.written):
            for k, v in figures.items():
                self.writer.add_scalar(tag(k), v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- MLflow -------------------------------------------------------------------------------------


def tracking_uri(setting: str) -> str:
    """--mlflow's URI: a server or any MLflow URI as given; a folder as a file store's absolute URI
    (workers do not share the driver's working folder)."""
    if "://" in setting or setting.startswith("databricks"):
        return setting
    return "file://" + os.path.abspath(os.path.expanduser(setting))


def allow_file_store() -> None:
    """MLflow 3 keeps the folder store (mlruns/, no server) behind this switch; a resumed Tune study's
    restored callback opens its store before any of our code names it."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _mlflow(uri: str):
    try:
        import mlflow
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'raysslvit[mlflow]'") from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating a new experiment"
    allow_file_store()
    mlflow.set_tracking_uri(uri)
    return mlflow


def check_nodes(setting: str, nodes: int) -> None:
    """A store on the driver's disk is out of reach of workers on other nodes."""
    if setting and nodes > 1 and tracking_uri(setting).startswith("file:"):
        raise UserError(f"this Ray has {nodes} nodes: --mlflow needs a tracking server every node reaches "
                        f"(--mlflow http://HOST:5000), not the folder {setting}")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def job_run(cfg, stage: str, section: str) -> dict | None:
    """On the driver: what rank 0 needs to open the stage's MLflow run (None without --mlflow)."""
    if not cfg.mlflow:
        return None
    d = cfg.to_dict()
    params = flat({"seed": d["seed"], "num_workers": d["num_workers"], "data": d["data"], "model": d["model"],
                   section: d[section]})
    tags = {"raysslvit.job": uuid.uuid4().hex, "raysslvit.stage": stage, "raysslvit.out": cfg.out_dir}
    if _study_run.get("uri") == tracking_uri(cfg.mlflow):
        tags["mlflow.parentRunId"] = _study_run["id"]
    return {"uri": tracking_uri(cfg.mlflow), "name": stage, "params": params, "tags": tags}


class StageRun:
    """Rank 0's MLflow run of a stage: the config, every epoch, the final figures."""

    def __init__(self, spec: dict, in_ray_train: bool):
        _mlflow(spec["uri"])
        args = dict(tracking_uri=spec["uri"], experiment_name=EXPERIMENT, run_name=spec["name"], tags=spec["tags"])
        if in_ray_train:  # Ray's integration: rank 0 only, the config as the run's params
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(spec["params"], create_experiment_if_not_exists=True, **args)
        else:
            import mlflow

            mlflow.set_experiment(EXPERIMENT)
            mlflow.start_run(run_name=spec["name"], tags=spec["tags"])
            mlflow.log_params(spec["params"])
            self.mlflow = mlflow
        self.written: set = set()

    def report(self, metrics: dict) -> None:
        for step, figures in new_points(metrics, self.written):
            self.mlflow.log_metrics(figures, step=step)

    def end(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def add_artifacts(spec: dict | None, folder: str) -> None:
    """On the driver, once the stage's result is written: its files into the run rank 0 made."""
    if spec is None:
        return
    mlflow = _mlflow(spec["uri"])
    client = mlflow.MlflowClient(spec["uri"])
    found = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                               filter_string=f"tags.`raysslvit.job` = '{spec['tags']['raysslvit.job']}'")
    for run in found:
        for name in ("model.pt", "metrics.json", "config.json"):
            if os.path.exists(path := os.path.join(folder, name)):
                client.log_artifact(run.info.run_id, path)


@contextlib.contextmanager
def study_run(cfg):
    """`run --mlflow`: one parent run for the study's stages; the report becomes its artifact."""
    if not cfg.mlflow:
        yield None
        return
    uri = tracking_uri(cfg.mlflow)
    client = _mlflow(uri).MlflowClient(uri)
    # the client's calls, not mlflow.start_run: an in-process stage opens the one active run itself
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"study {os.path.basename(cfg.out_dir)}",
                            tags={"raysslvit.out": cfg.out_dir, "raysslvit.preset": cfg.preset})
    _study_run.update(uri=uri, id=run.info.run_id)
    failed = True
    try:
        yield run
        failed = False
    finally:
        _study_run.clear()
        client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")


def add_report(files: list[str]) -> None:
    """The study's report files into its parent run."""
    if _study_run:
        client = _mlflow(_study_run["uri"]).MlflowClient(_study_run["uri"])
        for path in files:
            if os.path.exists(path):
                client.log_artifact(_study_run["id"], path)


def tune_callbacks(setting: str, study: str) -> list:
    """A Tune study's trials as MLflow runs (Ray's callback), their folders as artifacts."""
    if not setting:
        return []
    _mlflow(tracking_uri(setting))
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=tracking_uri(setting), experiment_name=f"{EXPERIMENT}-tune-{study}",
                                 save_artifact=True)]
