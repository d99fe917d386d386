"""Stage 1: self-supervised pretraining of model M (masked + rotated patches), or of the InfoNCE
baseline (`--objective infonce`, written to `<out>/ssl_infonce/`)."""
from __future__ import annotations

import torch

from raysslvit.config import Config, SSLConfig
from raysslvit.data import normalize, simclr_augment
from raysslvit.engine import WorkerContext, fit
from raysslvit.metrics.knn import knn_accuracy
from raysslvit.ssl import ContrastiveHeads, SSLHeads, corrupt, info_nce_loss, masked_rotation_loss, recon_targets
from raysslvit.stages.probe import extract_features
from raysslvit.vit import VisionTransformer


@torch.no_grad()
def knn_monitor(encoder: VisionTransformer, splits, cfg: SSLConfig) -> dict:
    """Weighted k-NN accuracy on val of the final CLS and of all final tokens (the probe's feature
    sets), against a seeded subset of train: class separability, every epoch, for ranking SSL configs."""
    if not cfg.knn_bank:
        return {}
    g = torch.Generator().manual_seed(0)
    bank = torch.randperm(len(splits.train_y), generator=g)[:cfg.knn_bank].to(splits.train_y.device)
    kinds = ("cls", "tokens")
    train = extract_features(encoder, splits.train_x[bank], 1, kinds)
    val = extract_features(encoder, splits.val_x, 1, kinds)
    return {f"val_knn_acc_{k}": knn_accuracy(train[k], splits.train_y[bank], val[k], splits.val_y, cfg.knn_k)
            for k in kinds}


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
        return {"val_rotation_acc": hits / n, "val_recon_mse": sq / n, **knn_monitor(model.encoder, splits, self.cfg)}

    def finish(self, model, splits):
        return {}


class InfoNCETask:
    """SimCLR: two batched augmented views per image, NT-Xent on the projected CLS outputs."""

    name, monitor = "ssl_infonce", None

    def __init__(self, cfg: SSLConfig, encoder: VisionTransformer):
        self.cfg, self.model = cfg, ContrastiveHeads(encoder, cfg.proj_dim)

    def _loss(self, model, x, generator=None):
        views = torch.cat([simclr_augment(x, generator=generator), simclr_augment(x, generator=generator)])
        z1, z2 = model(views).chunk(2)
        return info_nce_loss(z1, z2, self.cfg.temperature)

    def loss(self, model, x, y):
        return self._loss(model, x)

    @torch.no_grad()
    def evaluate(self, model, splits):
        g = torch.Generator(device=splits.val_x.device).manual_seed(1234)
        parts = [self._loss(model, splits.val_x[i:i + 512], g) for i in range(0, len(splits.val_x), 512)]
        return {"val_infonce_loss": sum(float(l) for l, _ in parts) / len(parts),
                "val_pair_acc": sum(float(p["pair_acc"]) for _, p in parts) / len(parts),
                **knn_monitor(model.encoder, splits, self.cfg)}

    def finish(self, model, splits):
        return {}


OBJECTIVES = {"masked_rotation": MaskedRotationTask, "infonce": InfoNCETask}


def worker(job, ctx: WorkerContext, report, resume) -> dict:
    cfg = job.cfg
    task = OBJECTIVES[cfg.ssl.objective](cfg.ssl, VisionTransformer(cfg.model))
    return fit(task, job.splits, cfg.ssl, ctx, report, resume, seed=cfg.seed)


def folder(cfg: Config) -> str:
    """`ssl` for model M, `ssl_infonce` for the InfoNCE baseline."""
    return OBJECTIVES[cfg.ssl.objective].name
