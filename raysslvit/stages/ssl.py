"""Stage 1: self-supervised pretraining of model M (masked + rotated patches)."""
from __future__ import annotations

import torch

from raysslvit.config import Config, SSLConfig
from raysslvit.data import normalize
from raysslvit.engine import WorkerContext, fit
from raysslvit.launch import launch
from raysslvit.ssl import SSLHeads, corrupt, masked_rotation_loss, recon_targets
from raysslvit.stages.common import load_data
from raysslvit.vit import VisionTransformer


class MaskedRotationTask:
    name, monitor = "ssl", None  # M is the last epoch's model; val metrics are only watched

    def __init__(self, cfg: SSLConfig, encoder: VisionTransformer):
        self.cfg, self.model = cfg, SSLHeads(encoder)
        self.patch = encoder.cfg.patch_size

    def _forward(self, model, x: torch.Tensor, generator=None):
        c = corrupt(x, self.patch, self.cfg.subset_ratio, self.cfg.mask_ratio, generator)
        rot_logits, recon = model(normalize(c.images), c.masked_idx)
        return c, rot_logits, recon

    def loss(self, model, x, y):
        c, rot_logits, recon = self._forward(model, x)
        return masked_rotation_loss(rot_logits, c.rot_label, recon.float(), recon_targets(c.targets, self.cfg.norm_pix),
                                    self.cfg.recon_weight)

    @torch.no_grad()
    def evaluate(self, model, splits):
        g = torch.Generator(device=splits.val_x.device).manual_seed(1234)  # the same corruption every epoch
        hits, sq, n = 0.0, 0.0, 0
        for i in range(0, len(splits.val_x), 1024):
            c, rot_logits, recon = self._forward(model, splits.val_x[i:i + 1024], g)
            hits += (rot_logits.argmax(1) == c.rot_label).sum().item()
            sq += ((recon.float() - recon_targets(c.targets, self.cfg.norm_pix)) ** 2).mean((1, 2)).sum().item()
            n += len(c.rot_label)
        return {"val_rotation_acc": hits / n, "val_recon_mse": sq / n}

    def finish(self, model, splits):
        return {}


def worker(cfg: Config, ctx: WorkerContext, report, resume) -> dict:
    splits = load_data(cfg, ctx.device)
    task = MaskedRotationTask(cfg.ssl, VisionTransformer(cfg.model))
    return fit(task, splits, cfg.ssl, ctx, report, resume, seed=cfg.seed)


def run(cfg: Config, fresh: bool = False) -> dict:
    load_data(cfg)  # bad data fails here, in one line, before any worker starts
    return launch("ssl", "ssl", worker, cfg, fresh)
