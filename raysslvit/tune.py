"""Ray Tune studies: `python -m raysslvit.tune --space NAME|path.yaml`.

A study file (tune_spaces/NAME.yaml) names the stages every trial runs in order, the base preset,
the search space by config field names, the seeds (a grid axis: every point gets every seed), the
validation metric Tune ranks and stops trials by, the scheduler, samples and resources. Each trial
is a Tune function that runs its stages through `launch` (one TorchTrainer per trained stage); the
last trained stage reports every epoch to Tune (`TuneReportCallback`), so ASHA can stop it early,
and the trial's last report adds every stage's final figures (test figures only then). The study
writes `results.parquet` and `results.csv`, one row per trial, beside Tune's own files.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import yaml

from raysslvit import storage, tracking
from raysslvit.artifacts import atomic_path
from raysslvit.config import PATH_KEYS, build_config, parse_assignments
from raysslvit.data import hand, source_digest
from raysslvit.errors import OneLineParser, UserError, run_cli
from raysslvit.storage import Storage

SPACES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tune_spaces")
KEYS = {"description", "shared", "stages", "preset", "overrides", "space", "seeds", "metric", "mode", "scheduler",
        "num_samples", "resources"}
SAMPLERS = ("grid", "choice", "uniform", "loguniform")


def _commands() -> tuple[list[str], list[str]]:
    """(the commands a trial may run, those that report every epoch), from the table of stages."""
    from raysslvit.stages import COMMANDS, STAGES

    return COMMANDS, [c for c in COMMANDS if any(s.epochs for s in STAGES.values() if s.command == c)]


# --- the study file -------------------------------------------------------------------------------


def load_space(name: str) -> dict:
    """Read and check a study file (a name in tune_spaces/ or a path); every value the config would
    reject is found here, before any trial starts."""
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(SPACES_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(SPACES_DIR) if f.endswith(".yaml"))
        raise UserError(f"unknown study {name!r}: use one of {', '.join(known)} or a path to a YAML file")
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    where = os.path.basename(path)
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping of study settings")
    if unknown := sorted(set(spec) - KEYS):
        raise UserError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    spec = {"preset": "smoke", "shared": [], "overrides": {}, "seeds": [0], "mode": "max", "scheduler": {"type": "none"},
            "num_samples": 1, "resources": {"trial_cpu": 1}, **spec, "path": path}
    stages = spec.get("stages")
    commands, trained = _commands()
    if not isinstance(stages, list) or not stages or any(s not in commands for s in stages):
        raise UserError(f"{where}: stages must list stages of {', '.join(commands)}, got {stages!r}")
    if spec["shared"] not in ([], ["ssl"]):
        raise UserError(f"{where}: shared may only hold [ssl] (model M, trained once for every trial), got {spec['shared']!r}")
    if not any(s in trained for s in stages):
        raise UserError(f"{where}: stages must include a trained stage ({', '.join(trained)}) to report epochs")
    if not isinstance(spec.get("space"), dict) or not spec["space"]:
        raise UserError(f"{where}: space must map config fields to a sampler ({', '.join(SAMPLERS)})")
    if not str(spec.get("metric", "")).startswith("val_"):
        raise UserError(f"{where}: metric must be a validation metric (val_...), got {spec.get('metric')!r}")
    if spec["mode"] not in ("max", "min"):
        raise UserError(f"{where}: mode must be max or min, got {spec['mode']!r}")
    if not isinstance(spec["seeds"], list) or not all(isinstance(s, int) for s in spec["seeds"]) or not spec["seeds"]:
        raise UserError(f"{where}: seeds must be a list of integers, got {spec['seeds']!r}")
    sched = spec["scheduler"]
    if not isinstance(sched, dict) or sched.get("type") not in ("asha", "none"):
        raise UserError(f"{where}: scheduler must be {{type: asha, grace_period: N}} or {{type: none}}, got {sched!r}")
    for field, sampler in spec["space"].items():
        if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
            raise UserError(f"{where}: {field} needs one sampler of {', '.join(SAMPLERS)}, got {sampler!r}")
        kind, values = next(iter(sampler.items()))
        if kind in ("grid", "choice") and not (isinstance(values, list) and values):
            raise UserError(f"{where}: {field}: {kind} needs a list of values, got {values!r}")
        if kind in ("uniform", "loguniform") and not (isinstance(values, list) and len(values) == 2):
            raise UserError(f"{where}: {field}: {kind} needs [low, high], got {values!r}")
    return spec


def check_points(spec: dict, preset: str) -> None:
    """Build the config of every listed value (and both ends of every range) on the preset."""
    for field, sampler in spec["space"].items():
        for value in next(iter(sampler.values())):
            try:
                build_config(preset, {**spec["overrides"], field: value})
            except UserError as e:
                raise UserError(f"{os.path.basename(spec['path'])}: {field} = {value!r}: {e}") from None


def param_space(spec: dict) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v)}
    space = {field: make[kind](values) for field, sampler in spec["space"].items() for kind, values in sampler.items()}
    return {**space, "seed": tune.grid_search(spec["seeds"])}


# --- one trial ------------------------------------------------------------------------------------


def trial(config: dict, spec: dict, preset: str, data: tuple | None = None) -> None:
    """A Tune trial: the study's stages in order, in the trial's own folder. `data`: the driver's
    (digest, decoded splits), through Ray's object store: a trial never reads the data folder."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysslvit.stages import run_command

    resources = spec["resources"]
    trial_dir = tune.get_context().get_trial_dir()  # on this trial's node, in Ray's session folder
    # its stages' folders also in the study's storage: a resumed trial finds its finished stages there
    overrides = {**spec["overrides"], **config, "out": os.path.join(trial_dir, "stages"),
                 "storage": storage.join(spec["storage"], os.path.basename(trial_dir), "stages"),
                 "cpus_per_worker": resources.get("cpus_per_worker", 1)}
    cfg = build_config(preset, overrides)
    if data is not None:
        d = cfg.data
        hand(d.data, d.data_dir, d.val_fraction, d.split_seed, *data)
    trained = _commands()[1]
    last_trained = [s for s in spec["stages"] if s in trained][-1]
    final = {}
    for stage in spec["stages"]:
        if stage == last_trained:  # in-process (--set launcher=local), the trial reports each epoch itself
            hooks = ({"callbacks": [TuneReportCallback()]} if cfg.launcher == "ray" else
                     {"on_epoch": lambda m: tune.report({k: v for k, v in m.items() if k != "history"})})
            result = run_command(stage, cfg, **hooks)
        else:  # earlier stages do not report to Tune; probe and analyze need no TorchTrainer
            local = stage not in trained and cfg.launcher == "ray"
            result = run_command(stage, replace(cfg, launcher="local") if local else cfg)
        final.update({f"{stage}.{k}": v for k, v in result.items() if isinstance(v, (int, float)) and k != "history"})
    metric = spec["metric"]
    tune.report({**final, metric: final[f"{last_trained}.{metric}"], "stages_done": True})


# --- the study ------------------------------------------------------------------------------------


def results_table(results, spec: dict, metric: str, mode: str):
    """One row per trial: config columns, seed, final and best metrics, status, wall time."""
    import pandas as pd

    rows = []
    for r in results:
        history = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        m = r.metrics or {}
        best = (history[metric].max() if mode == "max" else history[metric].min()) if metric in history else math.nan
        status = "error" if r.error else "finished" if m.get("stages_done") else "stopped early"
        rows.append({**{f: r.config.get(f) for f in spec["space"]}, "seed": r.config.get("seed"),
                     "trial": os.path.basename(r.path), "status": status, metric: m.get(metric),
                     f"best_{metric}": best, "epochs_reported": len(history),
                     "wall_time_s": m.get("time_total_s"),
                     **{k: v for k, v in m.items() if "." in k and k.split(".")[0] in spec["stages"]}})
    return pd.DataFrame(rows)


def write_table(table, study: Storage) -> None:
    """results.parquet and results.csv in the study folder: local (atomically) or in an object store."""
    for ext, write in (("parquet", table.to_parquet), ("csv", table.to_csv)):
        if not study.local:  # an object store's put is atomic already
            with study.fs.open_output_stream(f"{study.root}/results.{ext}") as f:
                write(f, index=False)
        else:
            with atomic_path(os.path.join(study.root, f"results.{ext}")) as tmp:
                write(tmp, index=False)


def run_study(args):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raysslvit.console import start_ray
    from raysslvit.stages import run_command
    from raysslvit.stages.common import load_data

    spec = load_space(args.space)
    preset = args.preset or spec["preset"]
    spec["overrides"] = {**spec["overrides"], **parse_assignments(args.set)}
    for key in set(PATH_KEYS) & set(spec["overrides"]):  # trials run in their own folders: paths from here
        spec["overrides"][key] = os.path.abspath(os.path.expanduser(spec["overrides"][key]))
    check_points(spec, preset)
    base = build_config(preset, spec["overrides"])
    digest = source_digest(base.data.data, base.data.data_dir)  # a missing data folder fails here, not in every trial
    # decoded once, here, and handed to every trial on every node through the object store (unless
    # the study varies the data itself)
    data = None if any(f.startswith("data.") for f in spec["space"]) else (digest, load_data(base))
    name = os.path.splitext(os.path.basename(spec["path"]))[0]
    root = Storage(args.storage_path)
    study, spec["storage"] = root.child(name), storage.join(root.uri, name)
    # Tune and its trials keep their state in that storage; an object store's file system is passed as such
    where = {} if root.local else {"storage_filesystem": root.fs}
    start_ray(verbose=False, address=args.address, log_to_driver=True)  # Tune's console shows its trials' lines
    if spec["shared"] and "checkpoint" not in spec["overrides"]:  # M once for every trial (reused while unchanged)
        if not root.local:
            raise UserError("a study with shared stages needs a local --storage-path")
        shared = build_config(preset, {**spec["overrides"], "out": os.path.join(study.root, "shared")})
        run_command("ssl", shared)
        spec["overrides"]["checkpoint"] = os.path.join(shared.out_dir, "ssl", "model.pt")
    sched = spec["scheduler"]
    scheduler = ASHAScheduler(grace_period=sched.get("grace_period", 1), max_t=10**6) if sched["type"] == "asha" else None
    res = spec["resources"]
    trial_cpu = res.get("trial_cpu", 1)
    fn = tune.with_resources(tune.with_parameters(trial, spec=spec, preset=preset, data=data), {"cpu": trial_cpu})
    # Tune reserves only the trial's own CPUs; its TorchTrainer asks for more later: leave room for it
    per_trial = trial_cpu + (res.get("cpus_per_worker", 1) * base.num_workers if base.launcher == "ray" else 0)
    total = int(ray.cluster_resources().get("CPU", 0))  # 0: an autoscaling cluster with no workers yet
    if total and per_trial > total:
        raise UserError(f"a trial needs {per_trial} CPUs with its TorchTrainer's workers, Ray has {total}: "
                        f"lower resources in {os.path.basename(spec['path'])} or --set launcher=local")
    concurrent = args.max_concurrent or (max(1, total // per_trial) if total else 0)
    if args.resume:
        tracking.allow_file_store()  # the study's MLflow callback, if it had one, comes back with it
        if not tune.Tuner.can_restore(study.root, **where):
            raise UserError(f"no study to resume at {study.uri}")
        tuner = tune.Tuner.restore(study.root, trainable=fn, resume_errored=True, **where)
    else:
        tuner = tune.Tuner(fn, param_space=param_space(spec),
                           tune_config=tune.TuneConfig(metric=spec["metric"], mode=spec["mode"], scheduler=scheduler,
                                                       num_samples=args.num_samples or spec["num_samples"],
                                                       max_concurrent_trials=concurrent,
                                                       # not with a TorchTrainer: an ASHA-stopped trial is still in its fit, its actor can't be reset
                                                       reuse_actors=base.launcher == "local"),
                           run_config=tune.RunConfig(name=name, storage_path=root.root,
                                                     callbacks=tracking.tune_callbacks(args.mlflow, name), **where))
    results = tuner.fit()
    table = results_table(results, spec, spec["metric"], spec["mode"])
    write_table(table, study)
    finished = table[table["status"] == "finished"]
    if len(finished):
        best = finished.sort_values(spec["metric"], ascending=spec["mode"] == "min").iloc[0]
        tests = " ".join(f"{k} {best[k]:.4f}" for k in table if k.endswith("test_acc"))
        print(f"best: {', '.join(f'{f}={best[f]}' for f in spec['space'])} seed={best['seed']}  "
              f"{spec['metric']} {best[spec['metric']]:.4f}  {tests}\nresults in {storage.join(study.uri, 'results.parquet')}",
              flush=True)
    ray.shutdown()
    return table


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m raysslvit.tune", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True, help="a study in tune_spaces/ (masking_ratio, depth, st_blocks) or a YAML path")
    p.add_argument("--preset", default="", help="the base preset (default: the study file's)")
    p.add_argument("--storage-path", default="runs/tune", help="a folder or s3://bucket/path")
    p.add_argument("--num-samples", type=int, default=0, help="samples per grid point (default: the study file's)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study; finished trials are kept")
    p.add_argument("--address", default="", help="a running Ray cluster (auto: the one this node belongs to)")
    p.add_argument("--mlflow", nargs="?", const="mlruns", default="", metavar="URI",
                   help="every trial as an MLflow run (Ray's MLflowLoggerCallback), in a server or folder (alone: mlruns/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a config value for every trial, e.g. --set ssl.epochs=8 --set data.data_dir=DIR")
    return run_cli("raysslvit.tune", lambda: run_study(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
