"""The one table of stages (STAGES), and the driver that runs any of them in its folder.

Every step of the study is a `Stage` record: its results key and folder, the command and config
section whose fields are its flags, the steps it needs, how the study configures it from the run's
config, the files it reads (resolved and checked once, on the driver, then handed to the workers by
value), its worker (trained under the launcher) or its driver-side function, whether it reports
epochs and the val metric of its curves. The CLI, `run`, the report and Tune read this table;
adding a stage is one record plus one worker function.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from raysslvit import storage, tracking
from raysslvit.artifacts import write_json
from raysslvit.config import Config, with_changes
from raysslvit.errors import UserError
from raysslvit.engine import final_state, result_model
from raysslvit.launch import Job, WorkerFn, launch
from raysslvit.rundir import RunFolder, load_state, stage_fingerprint
from raysslvit.storage import Storage, open_storage
from raysslvit.stages import analyze, captions, finetune, fusion, probe, ssl, video
from raysslvit.stages.common import encoder_path, load_data, read_checkpoint
from raysslvit.vit import VisionTransformer


def encoder_input(section: str) -> Callable[[Config], dict[str, str]]:
    """The encoder a stage of `section` starts from: --checkpoint or this run's M, checked on the
    driver; none for a random start (`<section>.init=random`, the controls)."""
    return lambda cfg: {} if getattr(cfg, section).init == "random" else {"checkpoint": encoder_path(cfg)}


def random_checkpoint(cfg: Config) -> dict:
    """A checkpoint of a randomly initialised encoder of the model section's shape, seeded by --seed."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        encoder = VisionTransformer(cfg.model)
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    return result_model("random", final_state(cfg.model.to_dict(), weights))


def hand_checkpoints(cfg: Config, paths: dict, splits) -> dict:
    """What workers of an encoder stage are handed: the checkpoint's weights themselves."""
    return {"checkpoint": read_checkpoint(paths["checkpoint"]) if "checkpoint" in paths else random_checkpoint(cfg)}


def hand_video(cfg: Config, paths: dict, splits) -> dict:
    """M's weights, once the driver has seen that every class holds a clip."""
    video.check_clips(cfg, splits)
    return hand_checkpoints(cfg, paths, splits)


@dataclass(frozen=True)
class Stage:
    """One step of the study: all that the CLI, `run`, the report and Tune need to know of it."""

    key: str  # results.json key and `run --stages` name
    folder: str  # <out>/<folder>/ in the study
    command: str  # `python -m raysslvit <command>`
    section: str  # config section: the command's own flags, and its part of the fingerprint
    needs: tuple[str, ...] = ()  # steps of the study whose outputs it reads
    variant: Callable[[Config], dict] = lambda cfg: {}  # how the study configures it ({"video.st_blocks": 2})
    folder_of: Callable[[Config], str] | None = None  # the command's folder for a config (default: folder)
    inputs: Callable[[Config], dict[str, str]] = lambda cfg: {}  # files it reads: checked, fingerprinted
    hand: Callable = lambda cfg, paths, splits: {}  # on the driver: what its workers are handed, by value
    worker: WorkerFn | None = None  # trained under the launcher (Ray Train or in-process) ...
    local: Callable | None = None  # ... or run on the driver: (cfg, folder, paths, splits) -> metrics
    fingerprint: Callable[[Config, dict], dict] | None = None  # default: stage_fingerprint of its section
    epochs: bool = False  # reports every epoch (Tune can stop it early)
    monitor: str | None = None  # the val metric of its training curve
    unavailable: Callable[[Config], str | None] = lambda cfg: None  # why it cannot run here (`run` skips it)
    ray_actors: bool = False  # runs Ray actors of its own on the driver: a worker group must free its CPUs first


_PROBE = dict(command="probe", section="probe", folder_of=probe.folder, worker=probe.worker,
              inputs=encoder_input("probe"), hand=hand_checkpoints)
_FINETUNE = dict(command="finetune", section="finetune", folder_of=finetune.folder, worker=finetune.worker,
                 inputs=encoder_input("finetune"), hand=hand_checkpoints, epochs=True, monitor="val_acc")
_VIDEO = dict(command="video", section="video", folder_of=video.folder, inputs=encoder_input("video"), hand=hand_video,
              needs=("ssl",), worker=video.worker, epochs=True, monitor="val_acc")

STAGES = {s.key: s for s in [
    Stage("ssl", "ssl", "ssl", "ssl", folder_of=ssl.folder, worker=ssl.worker, epochs=True, monitor="val_rotation_acc"),
    Stage("probe", "probe", needs=("ssl",), **_PROBE),
    # the controls: the same recipe, data and seed from random weights of M's shape
    Stage("probe_random", "probe_random", variant=lambda cfg: {"probe.init": "random"}, **_PROBE),
    Stage("infonce", "ssl_infonce", "ssl", "ssl", variant=lambda cfg: {"ssl.objective": "infonce"},
          folder_of=ssl.folder, worker=ssl.worker, epochs=True, monitor="val_pair_acc"),
    Stage("infonce_probe", "probe_ssl_infonce", needs=("infonce",),
          variant=lambda cfg: {"checkpoint": os.path.join(cfg.out_dir, STAGES["infonce"].folder, "model.pt")}, **_PROBE),
    Stage("finetune", "finetune", needs=("ssl",), **_FINETUNE),
    Stage("scratch", "scratch", variant=lambda cfg: {"finetune.init": "random"}, **_FINETUNE),
    Stage("analyze", "analyze", "analyze", "analyze", needs=("ssl", "finetune"), inputs=analyze.inputs,
          local=analyze.local),
    Stage("video_1", "video_1", variant=lambda cfg: {"video.st_blocks": 1}, **_VIDEO),
    Stage("video_2", "video_2", variant=lambda cfg: {"video.st_blocks": 2}, **_VIDEO),
    Stage("video_mean", "video_mean", variant=lambda cfg: {"video.temporal": "mean"}, **_VIDEO),
    Stage("captions", "captions", "captions", "captions", local=captions.local, fingerprint=captions.fingerprint,
          unavailable=captions.unavailable, ray_actors=True),
    Stage("fusion", "fusion", "fusion", "fusion", needs=("video_2", "captions"), inputs=fusion.inputs,
          hand=fusion.hand, worker=fusion.worker, epochs=True, monitor="val_acc"),
]}
# `python -m raysslvit <command>`, in the study's order
COMMANDS = list(dict.fromkeys(s.command for s in STAGES.values()))


def for_command(command: str, cfg: Config) -> Stage:
    """The record a command runs with this config: the study's step of the same folder (`video
    --st-blocks 2` is video_2), else the command's first record in the folder the config names."""
    first = next(s for s in STAGES.values() if s.command == command)
    folder = first.folder_of(cfg) if first.folder_of else first.folder
    return next((s for s in STAGES.values() if s.command == command and s.folder == folder),
                replace(first, key=folder, folder=folder))


def fetch_needs(stage: Stage, out_dir: str, store: Storage | None) -> None:
    """With a storage, the results of the steps a stage reads that this driver's folder lacks."""
    for need in stage.needs if store is not None else ():
        store.child(STAGES[need].folder).pull(os.path.join(out_dir, STAGES[need].folder))


def run_stage(stage: Stage, cfg: Config, fresh: bool = False, on_epoch: Callable[[dict], None] | None = None,
              callbacks: list | None = None, group=None) -> dict:
    """Any stage in `<out>/<folder>/`: its inputs resolved and checked on the driver, skipped when a
    verified result of the same fingerprint exists, resumed from a checkpoint of it, else run (its
    workers handed the data and the inputs' contents); one process at a time in a folder. `group`:
    an open Ray Train worker group to run on (`run_study` keeps one for consecutive stages)."""
    store = open_storage(cfg.storage)
    fetch_needs(stage, cfg.out_dir, store)
    paths = stage.inputs(cfg)
    fp = stage.fingerprint(cfg, paths) if stage.fingerprint else stage_fingerprint(cfg, stage.section, paths)
    folder = RunFolder(cfg.out_dir, stage.folder, fp, store)
    with folder.claim():
        if fresh:
            folder.clear_checkpoints()
        elif (done := folder.finished()) is not None:
            return done
        started = time.perf_counter()
        splits = load_data(cfg)  # decoded and validated once per process, before any worker starts
        if stage.local:
            return stage.local(cfg, folder, paths, splits)
        given = stage.hand(cfg, paths, splits)
        resume = None if fresh else folder.resume_point()
        job = Job(stage.folder, cfg, stage.worker, splits, given, fp, resume=load_state(resume),
                  resumed_after_epoch=folder.epoch_of(resume) if resume else None,
                  mlflow=tracking.job_run(cfg, stage.folder, stage.section))
        return launch(folder, job, paths, on_epoch, callbacks, decode_s=time.perf_counter() - started, group=group)


def run_command(command: str, cfg: Config, fresh: bool = False, **hooks) -> dict:
    """`python -m raysslvit <command>`: its record for this config, run in its folder."""
    # the command's record may depend on them (probe's folder on its encoder's stage)
    fetch_needs(next(s for s in STAGES.values() if s.command == command), cfg.out_dir, open_storage(cfg.storage))
    return run_stage(for_command(command, cfg), cfg, fresh, **hooks)


def study_steps(names: str = "") -> list[str]:
    """`--stages a,b` with every prerequisite, in the study's order; empty: all of them."""
    wanted = [n.strip() for n in names.split(",") if n.strip()] or list(STAGES)
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} in --stages: use {', '.join(STAGES)}")
    needed: set[str] = set()

    def add(step: str):
        if step not in needed:
            needed.add(step)
            for pre in STAGES[step].needs:
                add(pre)

    for step in wanted:
        add(step)
    return [s for s in STAGES if s in needed]


def run_study(cfg: Config, fresh: bool = False, stages: str = "") -> dict:
    """The study's steps in order (`stages`: a subset, with prerequisites); finished stages are
    skipped, interrupted ones resume. A stage that cannot run here (captions without weights) is
    skipped with a line saying why, and so is what needs it. `<out>/study.json` keeps what was
    skipped and the wall time, for the report."""
    started = time.perf_counter()
    steps, results, skipped = study_steps(stages), {}, {}
    bar = None
    if sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="study", unit="stage", leave=False)
    group = None
    if cfg.launcher == "ray":  # one worker group for the study's trained stages (docs/benchmark.md)
        from raysslvit.backend_ray import WorkerGroup

        group = WorkerGroup(cfg, verbose=cfg.verbose)
    try:
        for key in steps:
            stage = STAGES[key]
            if blocked := [n for n in stage.needs if n in skipped]:
                skipped[key] = skipped[blocked[0]]
                print(f"{key}: skipped (it needs {blocked[0]})", flush=True)
            elif why := stage.unavailable(cfg):
                skipped[key] = why
                print(f"{key}: skipped: {why}", flush=True)
            else:
                if stage.ray_actors and group is not None:
                    group.close()
                results[key] = run_stage(stage, with_changes(cfg, stage.variant(cfg)), fresh, group=group)
            if key in skipped:
                results[key] = {"skipped": skipped[key]}
            if bar is not None:
                bar.update()
    finally:
        if group is not None:
            group.close()
    if bar is not None:
        bar.close()
    write_json(os.path.join(cfg.out_dir, "study.json"), {"steps": steps, "skipped": skipped,
                                                         "wall_s": time.perf_counter() - started})
    if (store := open_storage(cfg.storage)) is not None:
        store.push(cfg.out_dir, "study.json")
    return results


def run_seeds(cfg: Config, seeds: list[int], fresh: bool = False, stages: str = "") -> dict:
    """The study once per seed (several: each in `<out>/seed_<k>/`), then the report over all of them."""
    from raysslvit import report

    with tracking.study_run(cfg):  # --mlflow: the stages' runs nested under one
        if len(seeds) > 1:
            for seed in seeds:
                print(f"=== seed {seed} ===", flush=True)
                run_study(replace(cfg, seed=seed, out=os.path.join(cfg.out_dir, f"seed_{seed}"),
                                  storage=storage.join(cfg.storage, f"seed_{seed}") if cfg.storage else ""), fresh, stages)
        else:
            run_study(replace(cfg, seed=seeds[0]) if seeds else cfg, fresh, stages)
        results = report.build(cfg.out_dir)
        tracking.add_report([os.path.join(cfg.out_dir, name) for name in report.FILES])
    if (store := open_storage(cfg.storage)) is not None:
        for name in report.FILES:
            store.push(cfg.out_dir, name)
    return results
