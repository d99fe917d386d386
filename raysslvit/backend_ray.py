"""The Ray Train backend: stages' jobs on a `TorchTrainer` worker group (DDP across `num_workers`).

One `WorkerGroup` (one TorchTrainer run) serves a study's consecutive trained stages, one job after
another, so its workers start once, not once per stage. The driver hands each job to every rank
through its mailbox (mailbox.py); rank 0 sends back its lines, every epoch's metrics and checkpoint
(which the driver writes into the stage's folder, so the run folder has one writer) and the final result;
every rank reports each epoch to Ray Train too, so Ray Train callbacks (Tune's) see it. A worker
that dies is restarted by Ray Train (`max_failures`) and asks for work again: the driver hands it
the job anew, resuming from the last checkpoint it wrote. A user error on a worker ends the job at
once, with its one line, and no retry: with peers, the worker raises it on, so Ray Train stops
every rank of the group (a peer may be waiting on it in a collective), and the job is handed to no
one again.
Starting Ray and its console noise are `console.py`.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import torch
from ray import cloudpickle

from raysslvit.backend_local import use_gpu
from raysslvit.config import Config
from raysslvit.console import alive_nodes, quiet_ray_reports, start_ray
from raysslvit.engine import WorkerContext
from raysslvit.errors import UserError
from raysslvit.launch import Job, run_job
from raysslvit.rundir import LatestCheckpoint, RunFolder
from raysslvit.storage import Storage
from raysslvit.tracking import check_nodes


def _serve(loop_config: dict) -> None:
    """Every Ray Train worker: say it is ready, then run the jobs handed to its rank until told to stop."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])  # Ray sets 1 thread per CPU resource by default
    quiet_ray_reports()
    tc = ray.train.get_context()
    rank, out = tc.get_world_rank(), loop_config["out"]
    jobs = loop_config["jobs"][rank]
    # messages travel pickled: the mailbox actor then never imports torch to hold them
    send = (lambda *message: out.put(cloudpickle.dumps(message))) if rank == 0 else (lambda *message: None)
    ctx = WorkerContext(rank=rank, world_size=tc.get_world_size(), device=ray.train.torch.get_device(),
                        prepare_model=ray.train.torch.prepare_model, sink=lambda line: send("line", line))
    send("ready", os.getpid())
    while (item := jobs.get()) is not None:
        splits, job = item[0], cloudpickle.loads(item[1])
        last = {}

        def report(metrics: dict, state: dict | None):
            # the state in the message itself: the mailbox (the driver's) keeps it if this worker dies
            send("epoch", metrics, state)
            ray.train.report(metrics)  # every rank: Ray Train's callbacks (Tune) see each epoch
            last["metrics"] = metrics

        try:
            run_job(job, ray.get(splits), ctx, report, job.resume)
            send("done", last["metrics"])  # the last report: the final metrics, with their timing
        except UserError as e:  # on any rank: the driver ends the job at once, the job is not handed again
            out.put(cloudpickle.dumps(("error", str(e))))
            if ctx.world_size > 1:
                raise  # so Ray Train stops every rank of the group: a peer may be waiting on this one


def group_key(cfg: Config) -> tuple:
    """What a worker group is sized and retried by: jobs of configs alike here can share one."""
    return cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.gpus_per_worker, cfg.max_failures


def worker_resources(cfg: Config) -> tuple[int, bool, dict]:
    """(threads, use_gpu, resources per worker): by default this machine's CPUs shared by the workers;
    inside a Ray actor (a Tune trial) only what is still free, the trial holding its own share."""
    import ray

    gpu = use_gpu(cfg.use_gpu, ray.cluster_resources().get("GPU", 0) > 0)
    # the driver counts all of Ray's CPUs: a stage that just ended may not have handed its own back yet
    pool = ray.available_resources() if ray.get_runtime_context().get_actor_id() else ray.cluster_resources()
    cpus = cfg.cpus_per_worker or max(1, min(os.cpu_count() or 1, int(pool.get("CPU", 0))) // cfg.num_workers)
    return cpus, gpu, {"CPU": cpus, **({"GPU": cfg.gpus_per_worker} if gpu else {})}


class WorkerGroup:
    """A TorchTrainer run that serves jobs; started at the first job, stopped by `close()`."""

    def __init__(self, cfg: Config, callbacks: list | None = None, verbose: bool = False):
        self.cfg, self.callbacks, self.verbose = cfg, callbacks or [], verbose
        self.trainer_thread, self.failure, self.ray_start_s = None, None, 0.0
        self._shipped: dict[int, object] = {}  # the data in the object store, put once per group

    def _start(self):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from raysslvit.mailbox import mailboxes

        self.ray_start_s = start_ray(verbose=self.cfg.verbose, address=self.cfg.address)
        nodes = alive_nodes()
        if nodes > 1 and not self.cfg.storage:  # Ray Train's own rule for a run across nodes
            raise UserError(f"this Ray has {nodes} nodes: a multi-node run needs --storage (a folder every node "
                            f"sees, or s3://bucket/prefix), where its checkpoints and results are kept")
        check_nodes(self.cfg.mlflow, nodes)
        threads, gpu, resources = worker_resources(self.cfg)
        boxes = mailboxes(["out", *(f"rank {rank}" for rank in range(self.cfg.num_workers))])
        self.out, self.jobs = boxes.pop("out"), list(boxes.values())
        self.quiet = self.verbose or ray.get_runtime_context().get_actor_id() is not None  # Tune shows trials' lines
        self.name = f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        storage = (Storage(self.cfg.storage).ray_train() if self.cfg.storage else
                   {"storage_path": os.path.join(self.cfg.out_dir, ".ray_train")})
        trainer = TorchTrainer(
            _serve, train_loop_config={"jobs": self.jobs, "out": self.out, "threads": threads},
            scaling_config=ScalingConfig(num_workers=self.cfg.num_workers, use_gpu=gpu, resources_per_worker=resources),
            run_config=RunConfig(name=self.name, **storage,
                                 failure_config=FailureConfig(max_failures=self.cfg.max_failures),
                                 callbacks=self.callbacks))

        def fit():
            try:
                trainer.fit()
            except Exception as e:  # the group is gone (retries spent): the job waiting on it ends
                self.failure = e
            self.out.put(cloudpickle.dumps(("ended", None)))

        self.trainer_thread = threading.Thread(target=fit, daemon=True)
        self.trainer_thread.start()

    def submit(self, job: Job, folder: RunFolder, on_epoch=None) -> tuple[dict, dict | None, dict]:
        """Run one job on the group; returns (final metrics, final checkpoint state, timing extras)."""
        import ray

        started_group = self.trainer_thread is None
        if started_group:
            self._start()
        ray_start_s, self.ray_start_s = self.ray_start_s, 0.0
        handed = time.perf_counter()
        if id(job.splits) not in self._shipped:  # once, for every worker on every node
            self._shipped = {id(job.splits): ray.put(job.splits)}
        data_s = time.perf_counter() - handed
        shipped = replace(job, splits=self._shipped[id(job.splits)])
        checkpoints = LatestCheckpoint(folder, f"{self.name}-{job.stage}", job.meta)
        if not started_group:
            self._hand(shipped)
        while True:
            kind, *body = cloudpickle.loads(self.out.get())  # the group's next message; the last is "ended"
            if kind == "ready":  # a new (or restarted) worker group: hand it the job, from the last checkpoint
                if not started_group:
                    print(f"{job.stage}: a worker died; Ray Train restarted the group: resuming", flush=True)
                started_group = False
                self._hand(replace(shipped, resume=checkpoints.state if checkpoints.state is not None else job.resume))
            elif kind == "line":
                if not self.quiet:
                    print(body[0], flush=True)
            elif kind == "epoch":
                metrics, state = body
                if state is not None:  # rank 0's checkpoint: the driver is the run folder's one writer
                    checkpoints.save(metrics["epoch"], state)
                if on_epoch is not None:
                    on_epoch(metrics)
            elif kind == "done":
                return body[0], checkpoints.state, {"ray_start_s": ray_start_s, "data_s": data_s}
            elif kind == "error":
                self.close(force=True)
                raise UserError(body[0])
            elif kind == "ended":
                self.trainer_thread = None
                raise RuntimeError(f"the Ray Train worker group ended during {job.stage}") from self.failure

    def _hand(self, job: Job) -> None:
        """The job to every rank: the data's object ref beside the rest, pickled."""
        item = (job.splits, cloudpickle.dumps(replace(job, splits=None)))
        for q in self.jobs:
            q.put(item)

    def close(self, force: bool = False) -> None:
        """Let the workers return and the run end. `force` (after a user error): do not wait, a rank
        may wait on a peer that gave up; the group goes with this process or its Tune trial."""
        if self.trainer_thread is None:
            return
        for q in self.jobs:
            q.put(None)
        if not force:
            self.trainer_thread.join()
        self.trainer_thread = None


def run(job: Job, folder: RunFolder, on_epoch=None, callbacks: list | None = None, group: WorkerGroup | None = None):
    """One job: on the study's open worker group when there is one (and no callbacks of its own),
    else on a group of its own."""
    if group is not None and not callbacks and group_key(group.cfg) == group_key(job.cfg):
        return group.submit(job, folder, on_epoch)
    own = WorkerGroup(job.cfg, callbacks, verbose=job.cfg.verbose)
    try:
        return own.submit(job, folder, on_epoch)
    finally:
        own.close()
