"""Stage 2: linear probe of M's frozen encoder.

Features are extracted once; linear classifiers for every weight decay of the grid train together
as one batched problem, and val picks the decay. The final CLS is always probed (the study's
protocol, `test_acc_cls`); `test_acc` is the probe of the feature set `--features` selects (FEATURES).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysslvit.config import Config, ProbeConfig
from raysslvit.data import normalize
from raysslvit.engine import WorkerContext, final_state, lr_at
from raysslvit.stages.common import encoder_from, encoder_path, read_checkpoint
from raysslvit.vit import VisionTransformer


def _multi(encoder, out, blocks):
    normed = [encoder.norm(t) for t in out["blocks"][-blocks:]]
    return torch.cat([torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=1) for t in normed], dim=1)


# feature set -> (encoder, forward_intermediates output, blocks) -> (B, d)
FEATURES = {
    "cls": lambda encoder, out, blocks: out["final"][:, 0],  # the study's protocol
    "multi": _multi,  # CLS + mean patch token of the last `blocks` blocks (DINO)
    "tokens": lambda encoder, out, blocks: out["final"].flatten(1),  # every final token, in place
}


@torch.no_grad()
def extract_features(encoder: VisionTransformer, x: torch.Tensor, blocks: int, names=tuple(FEATURES),
                     batch_size: int = 1024) -> dict:
    """uint8 images -> {feature set: (n, d)} for the named sets of FEATURES, one forward pass per batch."""
    encoder.eval()
    sets: dict[str, list] = {name: [] for name in names}
    for i in range(0, len(x), batch_size):
        out = encoder.forward_intermediates(normalize(x[i:i + batch_size]))
        for name in names:
            sets[name].append(FEATURES[name](encoder, out, blocks).float())
    return {name: torch.cat(parts) for name, parts in sets.items()}


def train_linear_probes(train_f, train_y, val_f, val_y, num_classes: int, cfg: ProbeConfig, seed: int = 0) -> dict:
    """One linear classifier per weight decay (L2 penalty), trained side by side with Adam on
    standardised features; returns the one with the best val accuracy."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    standardise = lambda f: (f - mean) / std
    xtr, xva = standardise(train_f), standardise(val_f)
    wds = torch.tensor(cfg.weight_decays, dtype=torch.float32, device=xtr.device)
    G, (n, d) = len(wds), xtr.shape
    W = torch.zeros(G, d, num_classes, device=xtr.device, requires_grad=True)
    b = torch.zeros(G, 1, num_classes, device=xtr.device, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.lr)
    steps_per_epoch = -(-n // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            perm = torch.randperm(n, generator=g).to(xtr.device)
        idx = perm[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, steps_per_epoch, cfg.lr)
        logits = torch.einsum("nd,gdc->gnc", xtr[idx], W) + b  # (G, B, C)
        ce = F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(G), reduction="none").view(G, -1).mean(1)
        loss = (ce + wds * W.pow(2).sum((1, 2))).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_acc = ((torch.einsum("nd,gdc->gnc", xva, W) + b).argmax(2) == val_y).float().mean(1)
    best = int(val_acc.argmax())
    return {"W": W[best].detach(), "b": b[best, 0].detach(), "mean": mean, "std": std,
            "weight_decay": float(wds[best]), "val_acc": float(val_acc[best]), "val_acc_by_wd": val_acc.tolist()}


def probe_accuracy(probe: dict, f: torch.Tensor, y: torch.Tensor) -> float:
    logits = ((f - probe["mean"]) / probe["std"]) @ probe["W"] + probe["b"]
    return (logits.argmax(1) == y).float().mean().item()


def worker(job, ctx: WorkerContext, report, resume) -> dict:
    cfg, splits = job.cfg, job.splits
    encoder = encoder_from(job.given["checkpoint"]).to(ctx.device)
    blocks = min(cfg.probe.probe_blocks, len(encoder.blocks))
    kinds = tuple(dict.fromkeys(("cls", cfg.probe.features)))  # the study's CLS probe, and the chosen one
    feats = {s: extract_features(encoder, splits.split(s)[0], blocks, kinds) for s in ("train", "val", "test")}
    metrics, probes = {"epoch": 1}, {}
    for kind in kinds:
        probe = train_linear_probes(feats["train"][kind], splits.train_y, feats["val"][kind], splits.val_y,
                                    len(splits.classes), cfg.probe, cfg.seed)
        probes[kind] = probe
        metrics.update({f"val_acc_{kind}": probe["val_acc"], f"weight_decay_{kind}": probe["weight_decay"],
                        f"test_acc_{kind}": probe_accuracy(probe, feats["test"][kind], splits.test_y)})
    chosen = cfg.probe.features
    metrics.update({"features": chosen, "val_acc": metrics[f"val_acc_{chosen}"], "test_acc": metrics[f"test_acc_{chosen}"]})
    ctx.log("probe " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    state = final_state(encoder.cfg.to_dict(),
                        {f"{k}.{n}": v for k, p in probes.items() for n, v in p.items() if isinstance(v, torch.Tensor)})
    report(metrics, state if ctx.rank == 0 else None)
    return metrics


def folder(cfg: Config) -> str:
    """`probe` for model M; `probe_<stage>` for another encoder (e.g. probe_ssl_infonce, probe_random)."""
    source = "random" if cfg.probe.init == "random" else read_checkpoint(encoder_path(cfg))["stage"]
    return "probe" if source == "ssl" else f"probe_{source}"
