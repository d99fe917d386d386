"""The in-process backend: a stage's job in this process, one worker, no Ray (also what a GPU
machine without Ray runs). Every epoch's checkpoint goes into the stage's folder, for resume."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from raysslvit.engine import WorkerContext
from raysslvit.errors import UserError
from raysslvit.launch import Job, run_job
from raysslvit.rundir import LatestCheckpoint, RunFolder


def use_gpu(setting: str, available: bool) -> bool:
    """--use-gpu auto | true | false against what this machine (or cluster) has."""
    if setting == "true" and not available:
        raise UserError("--use-gpu true, but no GPU is available")
    return setting == "true" or (setting == "auto" and available)


def run(job: Job, folder: RunFolder, on_epoch: Callable[[dict], None] | None = None, callbacks=None, group=None):
    cfg = job.cfg
    device = torch.device("cuda" if use_gpu(cfg.use_gpu, torch.cuda.is_available()) else "cpu")
    if cfg.cpus_per_worker:
        torch.set_num_threads(cfg.cpus_per_worker)
    checkpoints = LatestCheckpoint(folder, f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", job.meta)
    last = {}

    def report(metrics: dict, state: dict | None):
        last["metrics"] = metrics
        if state is not None:
            checkpoints.save(metrics["epoch"], state)
        if on_epoch is not None:
            on_epoch(metrics)

    run_job(job, job.splits, WorkerContext(rank=0, world_size=1, device=device), report, job.resume)
    return last["metrics"], checkpoints.state, {}
