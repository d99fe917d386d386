"""Factorised spatio-temporal model for pseudo-videos (ViViT model 2, Arnab et al. 2021).

A clip is T images of one class. The spatial encoder (model M) runs on every frame and keeps only
each frame's CLS output; a temporal transformer with its own CLS token and position embedding runs
over those T tokens; a linear head classifies the temporal CLS. Spatial and temporal blocks both
start from M's weights. `temporal="mean"` averages the frame tokens instead (ViViT's baseline).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from raysslvit.vit import VisionTransformer


class VideoTransformer(nn.Module):
    def __init__(self, encoder: VisionTransformer, num_classes: int, clip_len: int = 16, st_blocks: int = 1,
                 temporal: str = "transformer"):
        super().__init__()
        assert temporal in ("transformer", "mean"), temporal
        D, depth = encoder.embed_dim, len(encoder.blocks)
        self.encoder = encoder
        self.temporal = temporal
        # Temporal block i starts as a copy of M's block (depth - K + i): the last K blocks, in order.
        if temporal == "transformer":
            self.temporal_blocks = nn.ModuleList(copy.deepcopy(encoder.blocks[(depth - st_blocks + i) % depth])
                                                 for i in range(st_blocks))
            self.temporal_cls = nn.Parameter(encoder.cls_token.detach().clone())  # (1, 1, D), from M
            self.temporal_pos = nn.Parameter(torch.zeros(1, clip_len + 1, D))
            nn.init.trunc_normal_(self.temporal_pos, std=0.02)
            self.temporal_norm = copy.deepcopy(encoder.norm)
        # "mean" has no temporal parameters at all: DDP rejects parameters that get no gradient
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"temporal_cls", "temporal_pos"}

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised frames -> (B, T, D) frame CLS outputs of the spatial encoder."""
        B, T = clips.shape[:2]
        return self.encoder(clips.flatten(0, 1)).view(B, T, -1)

    def temporal_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame tokens -> the tokens leaving the temporal stage: (B, T + 1, D) with the
        temporal CLS first; for "mean", the frame tokens themselves."""
        if self.temporal == "mean":
            return frames
        B, T, D = frames.shape
        x = torch.cat([self.temporal_cls.expand(B, -1, -1), frames], dim=1) + self.temporal_pos[:, :T + 1]
        for blk in self.temporal_blocks:
            x = blk(x)
        return x

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens of `temporal_tokens` (or a block placed after it, as fusion's) -> (B, classes) logits."""
        if self.temporal == "mean":
            return self.head(tokens.mean(1))
        return self.head(self.temporal_norm(tokens[:, 0]))

    def forward_temporal(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame tokens -> (B, num_classes) logits."""
        return self.classify(self.temporal_tokens(frames))

    def forward(self, clips: torch.Tensor, frame_clip_len: int = 0):
        """Clip logits (B, classes); frame_clip_len > 0: also every frame's logits (B, T, classes), each
        frame through the temporal path as a static clip of that many copies (`static_logits`)."""
        frames = self.frame_features(clips)
        logits = self.forward_temporal(frames)
        if not frame_clip_len:
            return logits
        return logits, self.static_logits(frames.flatten(0, 1), frame_clip_len).view(*frames.shape[:2], -1)

    def static_logits(self, frames: torch.Tensor, clip_len: int) -> torch.Tensor:
        """(N, D) frame CLS outputs -> logits of each frame as a static clip of `clip_len` copies (the
        spatial encoder runs once per image: its output would be the same for every frame)."""
        return self.forward_temporal(frames[:, None].expand(-1, clip_len, -1))
