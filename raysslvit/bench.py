"""Benchmarks, printed as JSON: every figure is a ratio of two things timed side by side in one run.

    python -m raysslvit.bench [--embed-dim 128 --depth 4 --stem conv --batch-size 256 --data sample]

- step: training-step throughput of our classifier against timm's VisionTransformer, same config,
  same batch, alternating rounds (ours also with the last block computing every token, as timm's);
  and its model FLOP utilisation: FLOPs per step (PyTorch's counter) per second, over this
  machine's fp32 matmul peak measured in the same run;
- corruption: the masked + rotated corruption as a fraction of one whole SSL step;
- launcher: one SSL epoch through the Ray Train TorchTrainer stage against the same `fit` in-process;
- captions: the Ray Data caption pipeline's images/s with 2 actors per model against 1 (the
  weights of --blip-model / --clip-model; without them, tiny random models: the pipeline's own cost).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from raysslvit.artifacts import provenance, write_json
from raysslvit.config import build_config
from raysslvit.data import normalize
from raysslvit.ssl import SSLHeads, corrupt, masked_rotation_loss, recon_targets
from raysslvit.vit import Classifier, ConvStem, ViTConfig, VisionTransformer


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _train_step(model, opt, x, y):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


class _TimmConvStem(ConvStem):
    """Our conv stem behind timm's `embed_layer` interface (tokens out as (B, N, D))."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, **_):
        super().__init__(patch_size, embed_dim, in_chans)
        self.num_patches = (img_size // patch_size) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)


def bench_step(cfg: ViTConfig, batch: int, rounds: int, device) -> dict:
    """Ours vs timm with identical shapes (checked by parameter count): same input, alternating rounds."""
    import timm

    torch.manual_seed(0)
    ours = Classifier(VisionTransformer(cfg), 10).to(device)
    stem = {"embed_layer": _TimmConvStem} if cfg.stem == "conv" else {}
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=10, global_pool="token", **stem).to(device)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
    x, y = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device), torch.randint(0, 10, (batch,), device=device)
    # "ours" is the Classifier as fine-tuning runs it: its last block computes only CLS (same logits).
    # "ours_all_tokens" computes every token of the last block, as timm does.
    all_tokens = lambda b: ours.encoder.forward_head(ours.encoder.forward_features(b), ours.head)
    steps = {name: _train_step(fn, torch.optim.AdamW(m.parameters(), 1e-4), x, y)
             for name, fn, m in (("ours", ours, ours), ("timm", theirs, theirs), ("ours_all_tokens", all_tokens, ours))}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for r in range(rounds + 2):
        for name, step in steps.items():
            t = sum(_timed(step, sync) for _ in range(5)) / 5
            if r >= 2:  # the first rounds warm up allocators and kernels
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops(steps["ours"])
    peak = matmul_peak(device, sync)
    return {"ours_img_per_s": batch / med["ours"], "timm_img_per_s": batch / med["timm"],
            "throughput_ratio": med["timm"] / med["ours"],
            "ours_all_tokens_img_per_s": batch / med["ours_all_tokens"],
            "all_tokens_throughput_ratio": med["timm"] / med["ours_all_tokens"], "params": n_ours, "batch": batch,
            "flops_per_step": flops, "achieved_flop_s": flops / med["ours"], "peak_matmul_flop_s": peak,
            "mfu": flops / med["ours"] / peak}


def step_flops(step) -> float:
    """FLOPs of one training step (forward and backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def matmul_peak(device, sync, n: int = 2048, rounds: int = 10) -> float:
    """This machine's fp32 matmul FLOP/s, measured now: the best of `rounds` n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, sync) for _ in range(rounds))
    return 2 * n ** 3 / best


def bench_corruption(cfg: ViTConfig, batch: int, rounds: int, device) -> dict:
    """Cost of `corrupt` against one whole SSL step (corrupt + forward + backward + update)."""
    torch.manual_seed(0)
    model = SSLHeads(VisionTransformer(cfg)).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randint(0, 256, (batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, device=device)

    def ssl_step():
        c = corrupt(x, cfg.patch_size)
        rot, recon = model(normalize(c.images), c.masked_idx)
        loss, _ = masked_rotation_loss(rot, c.rot_label, recon, recon_targets(c.targets), 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    corr, step = [], []
    for r in range(rounds + 2):
        c_t = sum(_timed(lambda: corrupt(x, cfg.patch_size), sync) for _ in range(5)) / 5
        s_t = sum(_timed(ssl_step, sync) for _ in range(5)) / 5
        if r >= 2:
            corr.append(c_t)
            step.append(s_t)
    c_med, s_med = statistics.median(corr), statistics.median(step)
    return {"corruption_ms": 1e3 * c_med, "ssl_step_ms": 1e3 * s_med, "corruption_fraction": c_med / s_med,
            "batch": batch}


def bench_launcher(overrides: dict, epochs: int, threads: int = 0) -> dict:
    """The same SSL `fit` through TorchTrainer and in-process: per-epoch time and whole-call time.
    `threads` > 0 gives both that many compute threads (Ray started with as many CPUs), leaving the
    other cores to Ray's own processes."""
    from raysslvit.stages import run_command

    if threads:
        from raysslvit.console import start_ray

        start_ray(num_cpus=threads)
    out = {}
    for launcher in ("local", "ray"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config("cpu", {**overrides, "out": tmp, "launcher": launcher, "ssl.epochs": epochs,
                                       "ssl.warmup_epochs": 0, "cpus_per_worker": threads})
            t0 = time.perf_counter()
            metrics = run_command("ssl", cfg)
            out[launcher] = {"epoch_s": statistics.median(m["epoch_time_s"] for m in metrics["history"]),
                             "call_s": time.perf_counter() - t0}
    return {"local_epoch_s": out["local"]["epoch_s"], "ray_epoch_s": out["ray"]["epoch_s"],
            "epoch_ratio": out["ray"]["epoch_s"] / out["local"]["epoch_s"],
            "local_call_s": out["local"]["call_s"], "ray_call_s": out["ray"]["call_s"],
            "call_ratio": out["ray"]["call_s"] / out["local"]["call_s"], "epochs": epochs,
            "threads": torch.get_num_threads()}


def bench_captions(blip: str, clip: str, clip_pretrained: str, images: int, batch_size: int) -> dict:
    """The caption pipeline over the same `images` sample images with 1 and 2 actors per model."""
    import numpy as np

    from raysslvit.captions import caption_batches, resolve_weights
    from raysslvit.config import CaptionsConfig
    from raysslvit.console import start_ray
    from raysslvit.data import load_splits

    with tempfile.TemporaryDirectory() as tmp:
        if not blip:
            from raysslvit.tiny_models import save_tiny_caption_models

            tiny = save_tiny_caption_models(tmp)
            blip, clip = tiny["blip"], tiny["clip"]
        start_ray()
        x = load_splits("sample").train_x[:images].permute(0, 2, 3, 1).numpy()
        meta = {"id": [str(i) for i in range(len(x))], "split": ["train"] * len(x), "label": np.zeros(len(x), dtype=np.int64)}
        out = {"weights": {"blip": blip, "clip": clip}, "images": len(x)}
        for actors in (1, 2):
            c = CaptionsConfig(blip_model=blip, clip_model=clip, clip_pretrained=clip_pretrained, actors=actors,
                               batch_size=batch_size)
            weights = resolve_weights(c)
            t0 = time.perf_counter()
            rows = sum(len(b) for b in caption_batches(x, meta, c, weights, use_gpu=False))
            out[f"actors_{actors}_images_per_s"] = rows / (time.perf_counter() - t0)
    out["ratio_2_to_1"] = out["actors_2_images_per_s"] / out["actors_1_images_per_s"]
    return out


def main(argv=None) -> int:
    model = build_config("cpu").model  # the defaults: the cpu preset's model
    p = argparse.ArgumentParser(prog="python -m raysslvit.bench", description=__doc__.splitlines()[0])
    p.add_argument("--embed-dim", type=int, default=model.embed_dim)
    p.add_argument("--depth", type=int, default=model.depth)
    p.add_argument("--num-heads", type=int, default=model.num_heads)
    p.add_argument("--stem", default=model.stem, choices=("patch", "conv"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default="sample", help="data for the launcher epoch (sample | cifar10)")
    p.add_argument("--data-dir", default="", help="an ImageFolder tree for the launcher epoch")
    p.add_argument("--epochs", type=int, default=2, help="SSL epochs per launcher")
    p.add_argument("--threads", type=int, default=0,
                   help="compute threads for the launcher epochs (default: every core)")
    p.add_argument("--blip-model", default="", help="captions: BLIP weights (default: a tiny random model)")
    p.add_argument("--clip-model", default="", help="captions: open_clip model, with --blip-model")
    p.add_argument("--clip-pretrained", default="", help="captions: open_clip tag for a named model")
    p.add_argument("--caption-images", type=int, default=1000, help="captions: images per pipeline run")
    p.add_argument("--skip", action="append", default=[], choices=("step", "corruption", "launcher", "captions"))
    p.add_argument("--out", default=os.path.join("runs", "bench.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(model, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, stem=args.stem)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "model": cfg.to_dict()}
    if "step" not in args.skip:
        result["step"] = bench_step(cfg, args.batch_size, args.rounds, device)
    if "corruption" not in args.skip:
        result["corruption"] = bench_corruption(cfg, args.batch_size, args.rounds, device)
    if "launcher" not in args.skip:
        data = {"data.data_dir": args.data_dir} if args.data_dir else {"data.data": args.data}
        model_fields = {f"model.{k}": v for k, v in cfg.to_dict().items()}
        result["launcher"] = bench_launcher({**data, **model_fields}, args.epochs, args.threads)
    if "captions" not in args.skip:
        result["captions"] = bench_captions(args.blip_model, args.clip_model, args.clip_pretrained,
                                            args.caption_images, batch_size=64)
    result["provenance"] = provenance()
    write_json(args.out, result)
    print(__import__("json").dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
