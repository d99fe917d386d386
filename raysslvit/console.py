"""Ray on this console: starting (or joining) it, and keeping its own log lines off the console
unless --verbose (they stay in Ray's log folder); the stages' lines come through `backend_ray.Channel`."""
from __future__ import annotations

import logging
import os
import time


def start_ray(verbose: bool = False, **kwargs) -> float:
    """Join the Ray this process already runs in (a Tune trial) or the one `RAY_ADDRESS` names (a
    cluster); else start a local one. Keywords pass through to a Ray this call starts. Returns the
    seconds it took, charged to the stage that started it."""
    import ray

    if ray.is_initialized():
        return 0.0
    if os.environ.get("RAY_ADDRESS"):
        kwargs = {k: v for k, v in kwargs.items() if k == "log_to_driver"}  # a cluster's resources are its own
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # the token-auth notice, Ray Data's progress lines
    if not os.environ.get("RAY_ADDRESS"):  # a Ray of our own, on this machine (docs/benchmark.md)
        # Ray Train's controller looks at its workers every 2 s: a stage's end waited up to that long
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # one actor less per stage; it watches for cloud preemption, which a local machine never sees
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    started = time.perf_counter()
    ray.init(**{"log_to_driver": verbose, "configure_logging": False, **kwargs})
    return time.perf_counter() - started


def quiet_ray_reports() -> None:
    """Ray Train logs every report with its full metrics and every checkpoint with its path; keep the
    console to our one line per epoch. (Its reporting module names its logger by file path, so that
    name is looked up, not typed.)"""
    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)
