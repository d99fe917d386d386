"""One module per stage; each has `run(cfg, fresh)`; the trained ones also a `worker` (runs on a
Ray Train worker or in-process). `run_study` chains them into the study."""
import os
from dataclasses import replace

from raysslvit.config import Config
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


def run_study(cfg: Config, fresh: bool = False) -> dict:
    """The whole study in order; finished stages are skipped, interrupted ones resume: M and its
    probe, the InfoNCE baseline (SimCLR's objective, same encoder, probed the same way),
    fine-tuning, analysis, pseudo-video with one and two spatio-temporal blocks and the mean baseline,
    then captions and fusion, skipped with a line saying why when they cannot run here (no weights)."""
    results = {name: STAGES[name][1](cfg, fresh) for name in ("ssl", "probe")}
    baseline = replace(cfg, ssl=replace(cfg.ssl, objective="infonce"))
    baseline = replace(baseline, checkpoint=os.path.join(cfg.out_dir, ssl.stage_name(baseline), "model.pt"))
    results["ssl_infonce"] = ssl.run(baseline, fresh)
    results["probe_ssl_infonce"] = probe.run(baseline, fresh)
    results.update({name: STAGES[name][1](cfg, fresh) for name in ("finetune", "analyze")})
    for change in ({"st_blocks": 1}, {"st_blocks": 2}, {"temporal": "mean"}):
        variant = replace(cfg, video=replace(cfg.video, **change))
        results[video.stage_name(variant)] = video.run(variant, fresh)
    reason = captions.unavailable(cfg)
    if reason:
        print(f"captions, fusion: skipped: {reason}", flush=True)
        results["captions"] = results["fusion"] = {"skipped": reason}
    else:
        results["captions"] = captions.run(cfg, fresh)
        results["fusion"] = fusion.run(cfg, fresh)
    return results
