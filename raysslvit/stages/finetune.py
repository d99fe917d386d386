"""Stage 3: fine-tuning. Both SSL heads dropped, a new Linear(D, 10) on CLS, the whole model trained."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysslvit.config import Config, FinetuneConfig
from raysslvit.data import normalize
from raysslvit.engine import WorkerContext, accuracy, fit
from raysslvit.stages.common import encoder_from
from raysslvit.vit import Classifier


class ClassificationTask:
    """Cross-entropy with label smoothing and optional batched mixup; accuracy on val picks the epoch."""

    name, monitor = "finetune", "val_acc"

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module):
        self.cfg, self.model = cfg, model

    def loss(self, model, x, y):
        x = normalize(x)
        if self.cfg.mixup > 0:  # mix each image with its mirror in the batch, one lambda per batch
            lam = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
            logits = model(lam * x + (1 - lam) * x.flip(0)).float()
            ce = lambda t: F.cross_entropy(logits, t, label_smoothing=self.cfg.label_smoothing)
            loss = lam * ce(y) + (1 - lam) * ce(y.flip(0))
        else:
            logits = model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"acc": (logits.argmax(1) == y).float().mean().detach()}

    @staticmethod
    def _accuracy(model, x, y) -> float:
        return accuracy(lambda b: model(normalize(b)), x, y)

    def evaluate(self, model, splits):
        return {"val_acc": self._accuracy(model, splits.val_x, splits.val_y)}

    def finish(self, model, splits):
        n = len(splits.val_y)  # a train subset as large as val, for the train/val gap
        return {"test_acc": self._accuracy(model, splits.test_x, splits.test_y),
                "train_acc": self._accuracy(model, splits.train_x[:n], splits.train_y[:n])}


def worker(job, ctx: WorkerContext, report, resume) -> dict:
    cfg, splits = job.cfg, job.splits
    encoder = encoder_from(job.given["checkpoint"], drop_path=cfg.finetune.drop_path)
    task = ClassificationTask(cfg.finetune, Classifier(encoder, len(splits.classes)))
    task.name = folder(cfg)  # its lines say scratch for the control
    return fit(task, splits, cfg.finetune, ctx, report, resume, seed=cfg.seed, layer_decay=cfg.finetune.layer_decay)


def folder(cfg: Config) -> str:
    """`finetune` from M or --checkpoint; `scratch` from random weights (the control)."""
    return "scratch" if cfg.finetune.init == "random" else "finetune"
