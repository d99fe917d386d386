"""Stage 6: pseudo-video. Clips of 16 same-class train images train the factorised spatio-temporal
model (M's encoder per frame, a temporal transformer over the frame CLS tokens); every single val /
test image is then classified as a static clip of 16 equal frames.

Writes `<out>/video_<K>/` (K spatio-temporal blocks) or `<out>/video_mean/` (the average baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysslvit.config import Config, VideoConfig
from raysslvit.data import ClipSampler, normalize
from raysslvit.engine import WorkerContext, accuracy, fit, predict
from raysslvit.stages.common import encoder_from
from raysslvit.video import VideoTransformer


def folder(cfg: Config) -> str:
    name = "video_mean" if cfg.video.temporal == "mean" else f"video_{cfg.video.st_blocks}"
    return f"{name}_scratch" if cfg.video.init == "random" else name


def frame_features(model: VideoTransformer, x: torch.Tensor) -> torch.Tensor:
    """Every image's spatial CLS output (N, D), computed once and shared by the static-clip,
    one-frame and clip evaluations of the same images."""
    return predict(lambda b: model.encoder(normalize(b)), x)


def static_accuracy(model: VideoTransformer, frames: torch.Tensor, y: torch.Tensor, clip_len: int) -> float:
    """Every image (its `frame_features`) as a static clip of `clip_len` equal frames (clip_len 1:
    the one-frame classifier)."""
    return accuracy(lambda f: model.static_logits(f, clip_len), frames, y)


class ClipTask:
    """Cross-entropy on clip labels, plus `frame_loss` x cross-entropy of every frame classified as a
    static clip of `frame_clip_len` copies (deep supervision: 16 labels per clip reach the spatial
    encoder instead of one); val accuracy of static clips (the test protocol) picks the epoch."""

    monitor = "val_acc"

    def __init__(self, cfg: VideoConfig, model: VideoTransformer, name: str):
        self.cfg, self.model, self.name = cfg, model, name

    def loss(self, model, x, y, *extra):  # x: (B, T, 3, H, W) uint8, y: (B, T), one class per clip
        """`extra`: more inputs per clip after the frames (fusion: the frames' caption embeddings)."""
        ce = lambda logits, t: F.cross_entropy(logits.float(), t, label_smoothing=self.cfg.label_smoothing)
        if self.cfg.frame_loss == 0:
            logits = model(normalize(x), *extra)
            loss = ce(logits, y[:, 0])
        else:
            logits, frames = model(normalize(x), *extra, self.cfg.frame_clip_len)  # frames: (B, T, classes)
            loss = ce(logits, y[:, 0]) + self.cfg.frame_loss * ce(frames.flatten(0, 1), y.flatten())
        return loss, {"acc": (logits.argmax(1) == y[:, 0]).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, model, splits):
        frames = frame_features(model, splits.val_x)
        clips = ClipSampler(splits.val_y, self.cfg.clip_len, seed=1234).clips().to(frames.device)
        logits = predict(model.forward_temporal, frames[clips])
        return {"val_acc": static_accuracy(model, frames, splits.val_y, self.cfg.clip_len),
                "val_clip_acc": (logits.argmax(1) == splits.val_y[clips[:, 0]]).float().mean().item()}

    @torch.no_grad()
    def finish(self, model, splits):
        n = len(splits.val_y)  # a train subset as large as val, for the train/val gap
        test, train = frame_features(model, splits.test_x), frame_features(model, splits.train_x[:n])
        return {"test_acc": static_accuracy(model, test, splits.test_y, self.cfg.clip_len),
                "train_acc": static_accuracy(model, train, splits.train_y[:n], self.cfg.clip_len),
                "spatial_acc": static_accuracy(model, test, splits.test_y, 1)}


def clip_batcher(labels: torch.Tensor, cfg: VideoConfig, seed: int, ctx: WorkerContext):
    """`fit`'s batcher for clips: every epoch this rank's same-class clips, `batch_size // clip_len`
    images' worth of clips per step over all ranks."""
    sampler = ClipSampler(labels, cfg.clip_len, seed, ctx.rank, ctx.world_size)
    clips_per_step = max(1, cfg.batch_size // cfg.clip_len // ctx.world_size)

    def batcher(epoch: int) -> list[torch.Tensor]:
        sampler.set_epoch(epoch)
        return list(sampler.clips().to(ctx.device).split(clips_per_step))

    return batcher


def check_clips(cfg: Config, splits) -> None:
    """A class too small for one clip fails on the driver, in one line, before any worker starts."""
    ClipSampler(splits.train_y, cfg.video.clip_len)


def worker(job, ctx: WorkerContext, report, resume) -> dict:
    cfg, splits, v = job.cfg, job.splits, job.cfg.video
    encoder = encoder_from(job.given["checkpoint"], drop_path=v.drop_path)
    model = VideoTransformer(encoder, len(splits.classes), v.clip_len, v.st_blocks, v.temporal)
    task = ClipTask(v, model, job.stage)
    return fit(task, splits, v, ctx, report, resume, seed=cfg.seed, layer_decay=v.layer_decay,
               batcher=clip_batcher(splits.train_y, v, cfg.seed, ctx))
