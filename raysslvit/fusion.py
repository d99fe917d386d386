"""Caption fusion: the spatio-temporal video model plus one cross-attention transformer block.

After the last temporal block, every temporal token (the clip's CLS and its frames) is a query; the
keys and values are the clip's caption embeddings (one per frame, from CLIP), projected by a linear
layer to the model width. Pre-norm block: attention, MLP, norms and residuals. The temporal CLS is
classified, as in the video model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from raysslvit.video import VideoTransformer
from raysslvit.vit import Mlp


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) queries; context (B, M, D) keys and values."""
        kv = self.norm_kv(context)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class FusionTransformer(nn.Module):
    def __init__(self, video: VideoTransformer, text_dim: int):
        super().__init__()
        assert video.temporal == "transformer", "fusion queries the temporal tokens"
        D = video.encoder.embed_dim
        self.video = video
        self.text_proj = nn.Linear(text_dim, D)
        self.cross = CrossAttentionBlock(D, video.encoder.cfg.num_heads, video.encoder.cfg.mlp_ratio)

    @property
    def encoder(self):  # what checkpoints and the engine read the model's shape from
        return self.video.encoder

    def forward_temporal(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame tokens and (B, T, E) caption embeddings -> (B, classes) logits: the
        cross-attention block sits between the video model's temporal stage and its classifier."""
        return self.video.classify(self.cross(self.video.temporal_tokens(frames), self.text_proj(text)))

    def forward(self, clips: torch.Tensor, text: torch.Tensor, frame_clip_len: int = 0):
        """(B, T, 3, H, W) normalised frames, (B, T, E) their captions' embeddings -> clip logits (B,
        classes); frame_clip_len > 0: also every frame's logits (B, T, classes), each frame a static clip
        of that many copies with its own caption (as `VideoTransformer.forward`)."""
        frames = self.video.frame_features(clips)
        logits = self.forward_temporal(frames, text)
        if not frame_clip_len:
            return logits
        per_frame = self.static_logits(frames.flatten(0, 1), text.flatten(0, 1), frame_clip_len)
        return logits, per_frame.view(*frames.shape[:2], -1)

    def static_logits(self, frames: torch.Tensor, text: torch.Tensor, clip_len: int) -> torch.Tensor:
        """(N, D) frame CLS outputs and (N, E) each image's caption embedding -> each image as a static
        clip of `clip_len` copies, with its own caption on every frame."""
        return self.forward_temporal(frames[:, None].expand(-1, clip_len, -1), text[:, None].expand(-1, clip_len, -1))
