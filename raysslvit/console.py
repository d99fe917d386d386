"""Ray on this console: starting (or joining) it, and keeping its own log lines off the console
unless --verbose (they stay in Ray's log folder); the stages' lines come through `backend_ray.Channel`."""
from __future__ import annotations

import logging
import os
import time


def start_ray(verbose: bool = False, address: str = "", **kwargs) -> float:
    """Join the Ray this process already runs in (a Tune trial) or the cluster `address` or
    `RAY_ADDRESS` names; else start a new local one, on loopback only, never a `ray start` cluster
    found on this machine (a dead one would hang the call). Keywords pass through to a Ray this
    call starts. Returns the seconds it took, charged to the stage that started it."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return 0.0
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # the token-auth notice, Ray Data's progress lines
    if address:  # a cluster's resources are its own
        kwargs = {k: v for k, v in kwargs.items() if k == "log_to_driver"}
    else:
        # a Ray of our own (docs/benchmark.md): Ray Train's controller looks at its workers every 2 s,
        # so a stage's end waited up to that long; the preemption watcher is an actor per group that
        # watches for cloud preemption, which a local machine never sees
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # for a Ray of our own, and to join one on loopback (a test's; a Tune study's trials joining
    # their driver's): the node on 127.0.0.1. Ray 2.60 maps `_node_ip_address="127.0.0.1"` back to
    # the machine's network address (and listens on every interface) unless it thinks clusters are
    # off, as on macOS: so that too, for this call. (Joining, the address is Ray's to look up: two
    # nodes on one machine share 127.0.0.1, and naming it fails to pick one.)
    loopback = not address or address.rpartition(":")[0] in ("127.0.0.1", "localhost")
    started = time.perf_counter()
    cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, not loopback
    try:
        ray.init(address=address or "local", _node_ip_address=None if address else "127.0.0.1",
                 **{"log_to_driver": verbose, "configure_logging": False, **kwargs})
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
    return time.perf_counter() - started


def alive_nodes() -> int:
    """How many nodes the Ray this process is connected to has now."""
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def quiet_ray_reports() -> None:
    """Ray Train logs every report with its full metrics and every checkpoint with its path; keep the
    console to our one line per epoch. (Its reporting module names its logger by file path, so that
    name is looked up, not typed.)"""
    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)
