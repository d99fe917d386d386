"""A trained stage's job and `launch`, which runs it under the configured backend in its folder.

The driver builds the `Job`: everything a worker needs (config, the decoded data, the input weights,
the checkpoint to resume from), so a worker never looks for files. Backends: `local` (in-process,
also for GPU machines without Ray: `backend_local.py`) and `ray` (Ray Train `TorchTrainer`, DDP
across `num_workers`: `backend_ray.py`); both report every epoch and return (final metrics,
final checkpoint state, timing). The run folder (skip, resume, atomic writes) is `rundir.py`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from raysslvit.config import Config
from raysslvit.data import Splits
from raysslvit.engine import WorkerContext, result_model
from raysslvit.rundir import RunFolder
from raysslvit.tracking import EventLog, StageRun, add_artifacts

# (job, ctx, report, resume state) -> final metrics; `job.splits` is on the worker's device
WorkerFn = Callable[["Job", WorkerContext, Callable, "dict | None"], dict]


@dataclass
class Job:
    """What every worker of a stage is handed; nothing in it is looked up on the worker's disk."""

    stage: str  # its folder's name, also saved with its checkpoints
    cfg: Config
    worker: WorkerFn
    splits: Any  # Splits; a Ray object ref to them on the way to Ray workers
    given: dict  # inputs by value: weights, caption embeddings
    fingerprint: dict
    resume: dict | None = None  # the checkpoint state to continue from, read on the driver
    resumed_after_epoch: int | None = None
    mlflow: dict | None = None  # rank 0's MLflow run of the stage (tracking.job_run), with --mlflow

    @property
    def meta(self) -> dict:
        return {"stage": self.stage, "fingerprint": self.fingerprint}


def run_job(job: Job, splits: Splits, ctx: WorkerContext, report: Callable, resume: dict | None) -> dict:
    """On a worker: seed torch from the config, then the stage's worker on the device's data.
    Stages build their models before `fit` seeds each rank, and torch seeds itself at random on
    import: without this no two runs of one config would start alike."""
    torch.manual_seed(job.cfg.seed)
    started = time.time()
    run = StageRun(job.mlflow, in_ray_train=ctx.prepare_model is not None) if job.mlflow and ctx.rank == 0 else None

    def timed_report(metrics: dict, state: dict | None):  # where the stage's time went, for `launch`
        if run is not None:
            run.report(metrics)
        report({**metrics, "timing": {"started_unix": started, "worker_s": time.time() - started}}, state)

    try:
        final = job.worker(replace(job, splits=splits.to(ctx.device)), ctx, timed_report, resume)
    except BaseException:
        if run is not None:
            run.end(failed=True)
        raise
    if run is not None:
        run.end()
    return final


def launch(folder: RunFolder, job: Job, inputs: dict, on_epoch: Callable[[dict], None] | None = None,
           callbacks: list | None = None, decode_s: float = 0.0, group=None) -> dict:
    """Run `job` under `job.cfg.launcher` and write its result into `folder`. `on_epoch(metrics)`
    and Ray Train `callbacks` see every epoch's report; the last one carries the final metrics.
    `decode_s`: what decoding the data took the driver, for the wall time; `group`: the study's
    open Ray Train worker group (`backend_ray.WorkerGroup`), if any."""
    cfg = job.cfg
    how = "in-process" if cfg.launcher == "local" else f"Ray Train, {cfg.num_workers} worker(s)"
    print(f"{job.stage}: starting ({how}{', resuming' if job.resume else ''})", flush=True)
    started, started_unix = time.perf_counter(), time.time()
    if cfg.launcher == "local":  # no Ray imported: GPU machines without it run this
        from raysslvit.backend_local import run as backend
    else:
        from raysslvit.backend_ray import run as backend
    events = EventLog(folder.path, job.resumed_after_epoch) if cfg.tensorboard else None

    def each_epoch(metrics: dict):
        if events is not None:
            events.epoch(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    metrics, state, extra = backend(job, folder, on_epoch=each_epoch, callbacks=callbacks, group=group)
    extra["data_s"] = extra.get("data_s", 0.0) + decode_s
    timing = breakdown(metrics.get("timing"), time.perf_counter() - started + decode_s, started_unix - decode_s, **extra)
    if job.resumed_after_epoch is not None:  # this call's wall time covers only the epochs after it
        timing["resumed_after_epoch"] = job.resumed_after_epoch
    metrics = {**metrics, "timing": timing}
    if events is not None:  # before the result: a stage whose result is written has all its events
        events.close()
        if os.path.isdir(events.path):
            folder.push(events.path)
    # the model config travels with the weights (fine-tuning keeps M's shape)
    folder.write(cfg, metrics, result_model(job.stage, state) if state is not None else None, inputs=inputs,
                 data_sizes=job.splits.sizes())
    add_artifacts(job.mlflow, folder.path)
    print(f"{job.stage}: done in {timing['wall_s']:.0f} s: " + " ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_")) and isinstance(v, float))
        + f"  -> {folder.path}", flush=True)
    return metrics


def breakdown(worker: dict | None, wall: float, started_unix: float, ray_start_s: float = 0.0,
              data_s: float = 0.0) -> dict:
    """Where a stage's wall time went: starting Ray (the stage that started it), handing the data
    over, starting the workers (TorchTrainer), computing (training and evaluation), and the rest
    (the result's way back, the worker group's end)."""
    if not worker:
        return {"wall_s": wall, "ray_start_s": ray_start_s, "data_s": data_s}
    startup = max(0.0, worker["started_unix"] - started_unix - ray_start_s - data_s)
    return {"wall_s": wall, "ray_start_s": ray_start_s, "data_s": data_s, "startup_s": startup,
            "compute_s": worker["worker_s"],
            "finish_s": max(0.0, wall - ray_start_s - data_s - startup - worker["worker_s"])}
