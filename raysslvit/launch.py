"""The backends that run a stage's per-worker function, and `launch`, which puts one in a run folder.

Backends: `local` (the same function in-process, also for GPU machines without Ray) and `ray` (a
Ray Train `TorchTrainer`, DDP across `num_workers`). Both report every epoch (`on_epoch` in-process,
Ray Train callbacks such as Tune's `TuneReportCallback` on Ray) and return (final metrics, latest
checkpoint folder). The run folder (skip, resume, atomic writes) is `rundir.py`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from typing import Callable

import torch

from raysslvit import data
from raysslvit.artifacts import read_json, write_json
from raysslvit.config import Config
from raysslvit.engine import WorkerContext, result_model
from raysslvit.errors import UserError
from raysslvit.rundir import RunFolder, load_state, stage_fingerprint, write_checkpoint

# (cfg, ctx, report, resume_state) -> final metrics
WorkerFn = Callable[[Config, WorkerContext, Callable, "dict | None"], dict]
# Test hook: the Ray Train worker of rank 0 exits once, after reporting this epoch (0: never).
FAIL_AT_EPOCH = "RAYSSLVIT_TEST_FAIL_AT_EPOCH"
# --verbose: Ray's own logs (its workers', its controller's, its INFO lines) on the console too
VERBOSE = [False]
# seconds `start_ray` spent starting Ray, charged to the stage that started it
_RAY_START = [0.0]


def _use_gpu(cfg: Config, available: bool) -> bool:
    if cfg.use_gpu == "true" and not available:
        raise UserError("--use-gpu true, but no GPU is available")
    return cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and available)


def _call_worker(worker: WorkerFn, cfg: Config, ctx: WorkerContext, report: Callable, resume: dict | None) -> dict:
    """Seed torch from the config, then run the stage's worker. Stages build their models before
    `fit` seeds each rank, and torch seeds itself at random on import: without this no two runs of
    one config would start alike. Every rank builds the same initial model."""
    torch.manual_seed(cfg.seed)
    started = time.time()

    def timed_report(metrics: dict, state: dict | None):  # where the stage's time went, for `launch`
        timing = {"started_unix": started, "worker_s": time.time() - started, "data_s": data.LOAD_SECONDS[0]}
        report({**metrics, "timing": timing}, state)

    return worker(cfg, ctx, timed_report, resume)


# --- local: the same worker function, in this process --------------------------------------------


def run_local(worker: WorkerFn, cfg: Config, folder: RunFolder, meta: dict, resume: str | None,
              on_epoch: Callable[[dict], None] | None = None, callbacks=None):
    device = torch.device("cuda" if _use_gpu(cfg, torch.cuda.is_available()) else "cpu")
    if cfg.cpus_per_worker:
        torch.set_num_threads(cfg.cpus_per_worker)
    ctx = WorkerContext(rank=0, world_size=1, device=device)
    run_dir = os.path.join(folder.checkpoints, f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    last = {"metrics": None, "checkpoint": None}

    def report(metrics: dict, state: dict | None):
        last["metrics"] = metrics
        if state is not None:
            directory = os.path.join(run_dir, f"checkpoint_{metrics['epoch']:06d}")
            write_checkpoint(directory, state, {**meta, "epoch": metrics["epoch"]})
            if last["checkpoint"]:
                shutil.rmtree(last["checkpoint"], ignore_errors=True)
            last["checkpoint"] = directory
        if on_epoch is not None:
            on_epoch(metrics)

    _call_worker(worker, cfg, ctx, report, load_state(resume))
    return last["metrics"], last["checkpoint"]


# --- Ray Train ------------------------------------------------------------------------------------


def start_ray(**kwargs) -> None:
    """Join the Ray this process already runs in (a Tune trial) or the one `RAY_ADDRESS` names (a
    cluster); else start a local one. Keywords pass through to a Ray this call starts. Unless
    --verbose, Ray's workers do not print to this console (their logs stay in Ray's log folder):
    the stages' own lines come through `_ProgressChannel`."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        kwargs = {k: v for k, v in kwargs.items() if k == "log_to_driver"}  # a cluster's resources are its own
    if not VERBOSE[0]:
        logging.getLogger("ray").setLevel(logging.ERROR)  # the token-auth notice, Ray Data's progress lines
    if not os.environ.get("RAY_ADDRESS"):  # a Ray of our own, on this machine (docs/benchmark.md)
        # Ray Train's controller looks at its workers every 2 s: a stage's end waited up to that long
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # one actor less per stage; it watches for cloud preemption, which a local machine never sees
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    started = time.perf_counter()
    ray.init(**{"log_to_driver": VERBOSE[0], "configure_logging": False, **kwargs})
    _RAY_START[0] = time.perf_counter() - started


class _ProgressChannel:
    """The stages' progress lines from Ray Train workers to this console, through a Ray queue (an
    actor holding no CPU), drained by a thread while the trainer runs; one queue per Ray session."""

    _queue, _job = None, None

    @classmethod
    def queue(cls):
        import ray
        from ray.util.queue import Queue

        job = ray.get_runtime_context().get_job_id()
        if cls._queue is None or cls._job != job:
            cls._queue, cls._job = Queue(actor_options={"num_cpus": 0}), job
        return cls._queue

    def __init__(self):
        import threading

        self.q, self.stop = self.queue(), threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self):
        from ray.util.queue import Empty

        while True:
            try:
                print(self.q.get(timeout=0.2), flush=True)
            except Empty:
                if self.stop.is_set():
                    return

    def __enter__(self):
        self.thread.start()
        return self.q

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()
        return False


def _quiet_ray_reports() -> None:
    """Ray Train logs every report with its full metrics and every checkpoint with its path; keep the
    console to our one line per epoch. (Its reporting module names its logger by file path, so that
    name is looked up, not typed.)"""
    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: build the context, resume, call the stage's worker. A user
    error is written for the driver to raise, not raised here, so Ray Train does not retry it."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])  # Ray sets 1 thread per CPU resource by default
    _quiet_ray_reports()
    cfg, meta, fail_at = loop_config["cfg"], loop_config["meta"], loop_config["fail_at_epoch"]
    tc = ray.train.get_context()
    progress = loop_config["progress"]
    ctx = WorkerContext(rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                        device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model,
                        sink=progress.put if progress is not None else None)

    def report(metrics: dict, state: dict | None):
        if state is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(tmp, state, {**meta, "epoch": metrics["epoch"]})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if fail_at and metrics["epoch"] == fail_at and ctx.rank == 0:
            fired = os.path.join(loop_config["storage"], f"failed-at-{fail_at}")
            if not os.path.exists(fired):  # once: the restarted worker passes this epoch again
                open(fired, "w").close()
                os._exit(1)

    try:
        # a worker restarted within this run gets the run's latest checkpoint; a new run, the folder's
        if (ckpt := ray.train.get_checkpoint()) is not None:
            with ckpt.as_directory() as d:
                resume = load_state(d)
        else:
            resume = load_state(loop_config["resume"])
        _call_worker(loop_config["worker"], cfg, ctx, report, resume)
    except UserError as e:  # Ray Train retries every worker error: this one ends the run, said by a file
        write_json(loop_config["user_error"], {"rank": ctx.rank, "error": str(e)})


def _worker_resources(cfg: Config) -> tuple[int, bool, dict]:
    """(threads, use_gpu, resources per worker): by default this machine's CPUs shared by the workers;
    inside a Ray actor (a Tune trial) only what is still free, the trial holding its own share."""
    import ray

    use_gpu = _use_gpu(cfg, ray.cluster_resources().get("GPU", 0) > 0)
    # the driver counts all of Ray's CPUs: a stage that just ended may not have handed its own back yet
    pool = ray.available_resources() if ray.get_runtime_context().get_actor_id() else ray.cluster_resources()
    cpus = cfg.cpus_per_worker or max(1, min(os.cpu_count() or 1, int(pool.get("CPU", 0))) // cfg.num_workers)
    return cpus, use_gpu, {"CPU": cpus, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}


def run_ray(worker: WorkerFn, cfg: Config, folder: RunFolder, meta: dict, resume: str | None,
            on_epoch=None, callbacks: list | None = None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray()
    threads, use_gpu, resources = _worker_resources(cfg)
    storage = os.path.abspath(folder.checkpoints)
    name = f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    user_error = os.path.join(storage, f"{name}.user_error.json")
    # inside a Tune trial, Tune shows the workers' output; from a console, a progress channel does
    channel = _ProgressChannel() if not (VERBOSE[0] or ray.get_runtime_context().get_actor_id()) else None
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "worker": worker, "meta": meta, "threads": threads, "storage": storage,
                           "user_error": user_error, "fail_at_epoch": int(os.environ.get(FAIL_AT_EPOCH) or 0),
                           "progress": channel.q if channel else None, "resume": resume},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks or []),
    )
    with channel or contextlib.nullcontext():
        result = trainer.fit()
    if os.path.exists(user_error):
        message = read_json(user_error)["error"]
        os.remove(user_error)
        raise UserError(message)
    return result.metrics, result.checkpoint.path if result.checkpoint else None


BACKENDS = {"local": run_local, "ray": run_ray}


# --- the driver -----------------------------------------------------------------------------------


def launch(stage: str, section: str, worker: WorkerFn, cfg: Config, fresh: bool = False,
           inputs: dict[str, str] | None = None, on_epoch: Callable[[dict], None] | None = None,
           callbacks: list | None = None) -> dict:
    """Run one stage's `worker` under the configured backend in its run folder `<out>/<stage>/`:
    skipped when a result of the same fingerprint (config, `inputs` files' content, data) exists,
    resumed from a checkpoint of that fingerprint, else started over. `on_epoch(metrics)` (in-process)
    and Ray Train `callbacks` see every epoch's report; the last one carries the final metrics."""
    folder = RunFolder(cfg.out_dir, stage, stage_fingerprint(cfg, section, inputs))
    with folder.claim():
        return _launch_in(folder, worker, cfg, fresh, inputs or {}, on_epoch, callbacks)


def _launch_in(folder: RunFolder, worker: WorkerFn, cfg: Config, fresh: bool, inputs: dict, on_epoch, callbacks) -> dict:
    stage = folder.stage
    if fresh:
        folder.clear_checkpoints()
    elif (done := folder.finished()) is not None:
        return done
    resume = None if fresh else folder.resume_point()
    meta = {"stage": stage, "fingerprint": folder.fingerprint}
    how = "in-process" if cfg.launcher == "local" else f"Ray Train, {cfg.num_workers} worker(s)"
    print(f"{stage}: starting ({how}{', resuming' if resume else ''})", flush=True)
    started, started_unix = time.perf_counter(), time.time()
    metrics, checkpoint = BACKENDS[cfg.launcher](worker, cfg, folder, meta, resume, on_epoch=on_epoch,
                                                 callbacks=callbacks)
    timing = _timing(metrics.get("timing"), time.perf_counter() - started, started_unix)
    if resume:  # this call's wall time covers only the epochs after it; the history has them all
        timing["resumed_after_epoch"] = read_json(os.path.join(resume, "meta.json"))["epoch"]
    metrics = {**metrics, "timing": timing}
    state = load_state(checkpoint)  # the model config travels with the weights (fine-tuning keeps M's shape)
    model = result_model(stage, state) if state is not None else None
    folder.write(cfg, metrics, model, inputs=inputs)
    print(f"{stage}: done in {metrics['timing']['wall_s']:.0f} s: " + " ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_")) and isinstance(v, float))
        + f"  -> {folder.path}", flush=True)
    return metrics


def _timing(worker: dict | None, wall: float, started_unix: float) -> dict:
    """Where a stage's wall time went: starting Ray (the stage that started it), starting the
    workers (TorchTrainer), loading data, computing (training and evaluation), and the rest
    (the result's way back, the worker group's end)."""
    ray_start, _RAY_START[0] = _RAY_START[0], 0.0
    if not worker:
        return {"wall_s": wall, "ray_start_s": ray_start}
    startup = max(0.0, worker["started_unix"] - started_unix - ray_start)
    return {"wall_s": wall, "ray_start_s": ray_start, "startup_s": startup, "data_s": worker["data_s"],
            "compute_s": worker["worker_s"] - worker["data_s"],
            "finish_s": max(0.0, wall - ray_start - startup - worker["worker_s"])}
