"""The thin shell around a stage's per-worker function: Ray Train `TorchTrainer`, or the same
function in-process (`--launcher local`, also for GPU machines without Ray).

A stage folder `<out>/<stage>/` holds `metrics.json`, `config.json`, `model.pt` and
`checkpoints/`; an interrupted stage resumes from its latest checkpoint, a finished one is skipped.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Callable

import torch

from raysslvit.artifacts import provenance, read_json, save_torch, write_json
from raysslvit.config import SECTIONS, Config
from raysslvit.engine import WorkerContext
from raysslvit.errors import UserError

# (cfg, ctx, report, resume_state) -> final metrics
WorkerFn = Callable[[Config, WorkerContext, Callable, "dict | None"], dict]


def stage_fingerprint(cfg: Config, section: str) -> dict:
    """What must match for a checkpoint or result to belong to this config (as JSON)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    return {"seed": d["seed"], "checkpoint": d["checkpoint"], "data": d["data"], "model": d["model"],
            section: d[section]}


def same_fingerprint(saved: dict | None, current: dict) -> bool:
    """Equal, where a field that a saved result lacks (added to the config later) counts as its default."""
    if saved is None or set(saved) != set(current):
        return False
    for key, value in current.items():
        if isinstance(value, dict) and isinstance(saved[key], dict):
            defaults = json.loads(json.dumps(asdict(SECTIONS[key]()))) if key in SECTIONS else {}
            if any(saved[key].get(k, defaults.get(k)) != v for k, v in value.items()):
                return False
        elif saved[key] != value:
            return False
    return True


def _write_checkpoint(directory: str, state: dict, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_torch(os.path.join(directory, "state.pt"), state)
    write_json(os.path.join(directory, "meta.json"), meta)


def latest_checkpoint(stage_dir: str) -> str | None:
    """The checkpoint folder with the highest epoch under `<stage_dir>/checkpoints/`, if any."""
    found = []
    for meta in glob.glob(os.path.join(stage_dir, "checkpoints", "*", "checkpoint_*", "meta.json")):
        if os.path.exists(os.path.join(os.path.dirname(meta), "state.pt")):
            found.append((read_json(meta)["epoch"], os.path.getmtime(meta), os.path.dirname(meta)))
    return max(found)[2] if found else None


def load_state(directory: str | None) -> dict | None:
    return torch.load(os.path.join(directory, "state.pt"), weights_only=False) if directory else None


def _use_gpu(cfg: Config, available: bool) -> bool:
    if cfg.use_gpu == "true" and not available:
        raise UserError("--use-gpu true, but no GPU is available")
    return cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and available)


def _call_worker(worker: WorkerFn, cfg: Config, ctx: WorkerContext, report: Callable, resume: dict | None) -> dict:
    """Seed torch from the config, then run the stage's worker. Stages build their models before
    `fit` seeds each rank, and torch seeds itself at random on import: without this no two runs of
    one config would start alike. Every rank builds the same initial model."""
    torch.manual_seed(cfg.seed)
    return worker(cfg, ctx, report, resume)


# --- local: the same worker function, in this process --------------------------------------------


def _run_local(worker: WorkerFn, cfg: Config, stage_dir: str, meta: dict, resume: str | None):
    device = torch.device("cuda" if _use_gpu(cfg, torch.cuda.is_available()) else "cpu")
    ctx = WorkerContext(rank=0, world_size=1, device=device)
    run_dir = os.path.join(stage_dir, "checkpoints", f"local-{time.strftime('%Y%m%d-%H%M%S')}")
    last = {"metrics": None, "checkpoint": None}

    def report(metrics: dict, state: dict | None):
        last["metrics"] = metrics
        if state is not None:
            directory = os.path.join(run_dir, f"checkpoint_{metrics['epoch']:06d}")
            _write_checkpoint(directory, state, {**meta, "epoch": metrics["epoch"]})
            if last["checkpoint"]:
                shutil.rmtree(last["checkpoint"], ignore_errors=True)
            last["checkpoint"] = directory

    _call_worker(worker, cfg, ctx, report, load_state(resume))
    return last["metrics"], last["checkpoint"]


# --- Ray Train ------------------------------------------------------------------------------------


def start_ray(**kwargs) -> None:
    """`ray.init` for a Ray this process starts, the way every caller starts it (keywords pass through)."""
    import ray

    ray.init(log_to_driver=True, configure_logging=False, **kwargs)


def _quiet_ray_reports() -> None:
    """Ray Train logs every report with its full metrics and every checkpoint with its path; keep the
    console to our one line per epoch. (Its reporting module names its logger by file path, so that
    name is looked up, not typed.)"""
    from ray.train.v2._internal.execution import context, storage

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: build the context, resume, call the stage's worker."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])  # Ray sets 1 thread per CPU resource by default
    _quiet_ray_reports()
    cfg, meta = loop_config["cfg"], loop_config["meta"]
    tc = ray.train.get_context()
    ctx = WorkerContext(rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                        device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model)
    resume = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)

    def report(metrics: dict, state: dict | None):
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _write_checkpoint(tmp, state, {**meta, "epoch": metrics["epoch"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    _call_worker(loop_config["worker"], cfg, ctx, report, resume)


def _run_ray(worker: WorkerFn, cfg: Config, stage_dir: str, meta: dict, resume: str | None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        start_ray()
    resources = ray.cluster_resources()
    use_gpu = _use_gpu(cfg, resources.get("GPU", 0) > 0)
    cpus = max(1, int(resources.get("CPU", 1)) // cfg.num_workers)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "worker": worker, "meta": meta, "threads": cpus},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=os.path.abspath(os.path.join(stage_dir, "checkpoints")),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        resume_from_checkpoint=ray.train.Checkpoint.from_directory(resume) if resume else None,
    )
    result = trainer.fit()
    return result.metrics, result.checkpoint.path if result.checkpoint else None


# --- the driver -----------------------------------------------------------------------------------


def launch(stage: str, section: str, worker: WorkerFn, cfg: Config, fresh: bool = False) -> dict:
    """Run one stage's `worker` under the configured launcher and write its results atomically."""
    stage_dir = os.path.join(cfg.out_dir, stage)
    fingerprint = stage_fingerprint(cfg, section)
    metrics_path = os.path.join(stage_dir, "metrics.json")
    if fresh:
        shutil.rmtree(os.path.join(stage_dir, "checkpoints"), ignore_errors=True)
    elif os.path.exists(metrics_path) and same_fingerprint(read_json(os.path.join(stage_dir, "config.json")).get("fingerprint"), fingerprint):
        print(f"{stage}: done already in {stage_dir} (--fresh to redo)", flush=True)
        return read_json(metrics_path)
    resume = None if fresh else latest_checkpoint(stage_dir)
    if resume and not same_fingerprint(read_json(os.path.join(resume, "meta.json")).get("fingerprint"), fingerprint):
        raise UserError(f"{resume} was written with a different config: use --fresh or another --out")

    meta = {"stage": stage, "fingerprint": fingerprint}
    if cfg.launcher == "local":
        metrics, checkpoint = _run_local(worker, cfg, stage_dir, meta, resume)
    else:
        metrics, checkpoint = _run_ray(worker, cfg, stage_dir, meta, resume)

    state = load_state(checkpoint)
    if state is not None:  # the model config travels with the weights (fine-tuning keeps M's shape)
        save_torch(os.path.join(stage_dir, "model.pt"),
                   {"stage": stage, "model_config": state["model_config"], "state_dict": state["best_state"]})
    write_json(os.path.join(stage_dir, "config.json"),
               {"config": cfg.to_dict(), "fingerprint": fingerprint, "seed": cfg.seed, **provenance()})
    write_json(metrics_path, metrics)
    print(f"{stage}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                  if k.startswith(("val_", "test_")) and isinstance(v, float)) + f"  -> {stage_dir}", flush=True)
    return metrics
