"""One module per stage; each has `run(cfg, fresh)`; the trained ones also a `worker` (runs on a
Ray Train worker or in-process). `run_study` chains them into the study."""
import os
import sys
import time
from dataclasses import replace

from raysslvit.artifacts import write_json
from raysslvit.config import Config
from raysslvit.errors import UserError
from raysslvit.stages import analyze, captions, finetune, fusion, probe, ssl, video

# stage name -> (config section whose fields are its CLI flags, run function)
STAGES = {
    "ssl": ("ssl", ssl.run),
    "probe": ("probe", probe.run),
    "finetune": ("finetune", finetune.run),
    "analyze": ("analyze", analyze.run),
    "video": ("video", video.run),
    "captions": ("captions", captions.run),
    "fusion": ("fusion", fusion.run),
}

# The study's steps in order (the report's keys), each with the steps it needs.
STUDY = {
    "ssl": (), "probe": ("ssl",), "infonce": (), "infonce_probe": ("infonce",), "finetune": ("ssl",),
    "analyze": ("ssl", "finetune"), "video_1": ("ssl",), "video_2": ("ssl",), "video_mean": ("ssl",),
    "captions": (), "fusion": ("video_2", "captions"),
}


def study_steps(names: str = "") -> list[str]:
    """`--stages a,b` with every prerequisite, in the study's order; empty: all of them."""
    wanted = [n.strip() for n in names.split(",") if n.strip()] or list(STUDY)
    unknown = [n for n in wanted if n not in STUDY]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} in --stages: use {', '.join(STUDY)}")
    needed: set[str] = set()

    def add(step: str):
        if step not in needed:
            needed.add(step)
            for pre in STUDY[step]:
                add(pre)

    for step in wanted:
        add(step)
    return [s for s in STUDY if s in needed]


def _infonce(cfg: Config) -> Config:
    """The InfoNCE baseline: SimCLR's objective, same encoder, probed the same way."""
    baseline = replace(cfg, ssl=replace(cfg.ssl, objective="infonce"))
    return replace(baseline, checkpoint=os.path.join(cfg.out_dir, ssl.stage_name(baseline), "model.pt"))


def _video(cfg: Config, **change) -> Config:
    return replace(cfg, video=replace(cfg.video, **change))


STEPS = {
    "ssl": lambda cfg, fresh: ssl.run(cfg, fresh),
    "probe": lambda cfg, fresh: probe.run(cfg, fresh),
    "infonce": lambda cfg, fresh: ssl.run(_infonce(cfg), fresh),
    "infonce_probe": lambda cfg, fresh: probe.run(_infonce(cfg), fresh),
    "finetune": lambda cfg, fresh: finetune.run(cfg, fresh),
    "analyze": lambda cfg, fresh: analyze.run(cfg, fresh),
    "video_1": lambda cfg, fresh: video.run(_video(cfg, st_blocks=1), fresh),
    "video_2": lambda cfg, fresh: video.run(_video(cfg, st_blocks=2), fresh),
    "video_mean": lambda cfg, fresh: video.run(_video(cfg, temporal="mean"), fresh),
    "captions": lambda cfg, fresh: captions.run(cfg, fresh),
    "fusion": lambda cfg, fresh: fusion.run(cfg, fresh),
}


def run_study(cfg: Config, fresh: bool = False, stages: str = "") -> dict:
    """The study's steps in order (`stages`: a subset, with prerequisites); finished stages are
    skipped, interrupted ones resume. Captions and fusion are skipped, with a line saying why, where
    they cannot run here (no weights). `<out>/study.json` keeps what was skipped and the wall time,
    for the report."""
    started = time.perf_counter()
    steps, results, skipped = study_steps(stages), {}, {}
    bar = None
    if sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="study", unit="stage", leave=False)
    for step in steps:
        if step == "captions" and (why := captions.unavailable(cfg)):
            skipped["captions"] = skipped["fusion"] = {"skipped": why}
            print(f"captions, fusion: skipped: {why}", flush=True)
        if step in skipped:
            results[step] = skipped[step]
        else:
            results[step] = STEPS[step](cfg, fresh)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    write_json(os.path.join(cfg.out_dir, "study.json"), {"steps": steps, "skipped": {k: v["skipped"] for k, v in skipped.items()},
                                                         "wall_s": time.perf_counter() - started})
    return results


def run_seeds(cfg: Config, seeds: list[int], fresh: bool = False, stages: str = "") -> dict:
    """The study once per seed (several: each in `<out>/seed_<k>/`), then the report over all of them."""
    from raysslvit import report

    if len(seeds) > 1:
        for seed in seeds:
            print(f"=== seed {seed} ===", flush=True)
            run_study(replace(cfg, seed=seed, out=os.path.join(cfg.out_dir, f"seed_{seed}")), fresh, stages)
    else:
        run_study(replace(cfg, seed=seeds[0]) if seeds else cfg, fresh, stages)
    return report.build(cfg.out_dir)
