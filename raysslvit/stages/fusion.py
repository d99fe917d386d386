"""Stage 7b: caption fusion. The video model with K spatio-temporal blocks (default: this run's
trained `video_<K>`) gains a cross-attention block over its frames' CLIP caption embeddings
(`raysslvit.fusion`) and trains on clips; every val / test image is then a static clip with its own
caption on every frame.

`<out>/fusion/metrics.json` also says where the gain comes from, since a caption may name the class:
`text_only_test_acc` (a linear probe on the caption embeddings alone), `shuffled_caption_test_acc`
(the fused model given other test images' captions), `no_caption_test_acc` (the video model it
started from, alone) and `label_word_rate` (share of captions naming their class).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from raysslvit.captions import label_word_rate
from raysslvit.config import Config, ProbeConfig
from raysslvit.data import Splits
from raysslvit.engine import WorkerContext, fit, predict
from raysslvit.errors import UserError
from raysslvit.fusion import FusionTransformer
from raysslvit.stages.captions import load_table, table_path
from raysslvit.stages.common import encoder_from, encoder_path, read_checkpoint
from raysslvit.stages.probe import probe_accuracy, train_linear_probes
from raysslvit.stages.video import ClipTask, clip_batcher, frame_features, static_accuracy
from raysslvit.video import VideoTransformer


def captions_path(cfg: Config) -> str:
    return cfg.fusion.captions or table_path(cfg)


def video_path(cfg: Config) -> str | None:
    """The trained video model fusion starts from: --video-checkpoint, else this run's video_<K> when
    it exists; None: start from M with new temporal blocks."""
    f = cfg.fusion
    if f.video_checkpoint:
        if not os.path.isfile(f.video_checkpoint):
            raise UserError(f"video checkpoint not found: {f.video_checkpoint}")
        return f.video_checkpoint
    default = os.path.join(cfg.out_dir, f"video_{f.st_blocks}", "model.pt")
    return default if os.path.isfile(default) else None


def caption_embeddings(path: str, splits: Splits) -> tuple[dict, dict]:
    """({split: (N, E) float32 embeddings}, {split: captions}) in the splits' image order, joined by id."""
    table = load_table(path)
    emb, text, known = {}, {}, set(table.index)
    for s in ("train", "val", "test"):
        ids = splits.image_ids(s)
        missing = [i for i in ids if i not in known]
        if missing:
            raise UserError(f"{path} has no caption for image {missing[0]} of {s} (made from other data? rerun captions)")
        rows = table.loc[ids]
        if not np.array_equal(rows["label"].to_numpy(), splits.split(s)[1].numpy()):
            raise UserError(f"{path}: labels differ from the data's (made from other data? rerun captions)")
        emb[s] = torch.from_numpy(np.stack(rows["embedding"].to_numpy()).astype(np.float32))
        text[s] = rows["caption"].tolist()
    return emb, text


def inputs(cfg: Config) -> dict[str, str]:
    """The model fusion starts from (a trained video model, else M) and the captions table."""
    start = video_path(cfg)
    if start is None:
        print(f"fusion: no trained video_{cfg.fusion.st_blocks} model: starting from M with new temporal blocks", flush=True)
    return {"checkpoint": start or encoder_path(cfg), "captions": captions_path(cfg)}


def hand(cfg: Config, paths: dict, splits: Splits) -> dict:
    """On the driver: the starting weights, whether they are a video model's, and the captions'
    embeddings in the splits' order (test captions' text too, for the label word rate)."""
    emb, text = caption_embeddings(paths["captions"], splits)
    return {"checkpoint": read_checkpoint(paths["checkpoint"]), "trained_video": paths["checkpoint"] == video_path(cfg),
            "text": emb, "test_captions": text["test"], "source": paths["checkpoint"]}


def build_model(cfg: Config, given: dict, num_classes: int, text_dim: int) -> FusionTransformer:
    f = cfg.fusion
    video = VideoTransformer(encoder_from(given["checkpoint"], drop_path=f.drop_path), num_classes, f.clip_len, f.st_blocks)
    if given["trained_video"]:
        try:
            video.load_state_dict(given["checkpoint"]["state_dict"])
        except RuntimeError:
            raise UserError(f"{given['source']} is not a video model with {f.st_blocks} spatio-temporal block(s), clips "
                            f"of {f.clip_len} and {num_classes} classes: pass a matching --video-checkpoint") from None
    return FusionTransformer(video, text_dim)


def _static(model: FusionTransformer, frames: torch.Tensor, text: torch.Tensor, clip_len: int) -> torch.Tensor:
    D = frames.shape[1]
    return predict(lambda ft: model.static_logits(ft[:, :D], ft[:, D:], clip_len), torch.cat([frames, text], 1))


class FusionTask(ClipTask):
    """The video stage's clip (+ per-frame) loss (`ClipTask.loss`), every frame with its own caption
    (`batch_inputs`); val accuracy of static clips with each image's own caption picks the epoch."""

    def __init__(self, cfg, model, name, text: dict, extras: dict):
        super().__init__(cfg, model, name)
        self.text, self.extras = text, extras

    def batch_inputs(self, idx):
        return (self.text["train"][idx],)

    def _accuracy(self, model, x, y, text) -> float:
        frames = frame_features(model, x)
        return (_static(model, frames, text, self.cfg.clip_len).argmax(1) == y).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model, splits):
        return {"val_acc": self._accuracy(model, splits.val_x, splits.val_y, self.text["val"])}

    @torch.no_grad()
    def finish(self, model, splits):
        n = len(splits.val_y)  # a train subset as large as val, for the train/val gap
        g = torch.Generator().manual_seed(1234)
        shuffled = self.text["test"][torch.randperm(len(splits.test_y), generator=g).to(self.text["test"].device)]
        return {"test_acc": self._accuracy(model, splits.test_x, splits.test_y, self.text["test"]),
                "train_acc": self._accuracy(model, splits.train_x[:n], splits.train_y[:n], self.text["train"][:n]),
                "shuffled_caption_test_acc": self._accuracy(model, splits.test_x, splits.test_y, shuffled),
                **self.extras}


def worker(job, ctx: WorkerContext, report, resume) -> dict:
    cfg, splits, f = job.cfg, job.splits, job.cfg.fusion
    text = {s: e.to(ctx.device) for s, e in job.given["text"].items()}
    model = build_model(cfg, job.given, len(splits.classes), text["train"].shape[1]).to(ctx.device)
    probe = train_linear_probes(text["train"], splits.train_y, text["val"], splits.val_y, len(splits.classes),
                                ProbeConfig(), cfg.seed)
    extras = {"text_only_test_acc": probe_accuracy(probe, text["test"], splits.test_y),
              "label_word_rate": label_word_rate(job.given["test_captions"], splits.test_y.tolist(), splits.classes),
              # the video model alone: only a trained one's figure means anything
              "no_caption_test_acc": static_accuracy(model.video, frame_features(model.video, splits.test_x),
                                                     splits.test_y, f.clip_len) if job.given["trained_video"] else None}
    task = FusionTask(f, model, "fusion", text, extras)
    return fit(task, splits, f, ctx, report, resume, seed=cfg.seed, layer_decay=f.layer_decay,
               batcher=clip_batcher(splits.train_y, f, cfg.seed, ctx))
