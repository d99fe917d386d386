"""Token similarity: the study's CLS-to-patch maps, the full token-by-token matrix, and numbers for
how focused a map is (entropy and top-k mass of its softmax)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_patch_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> (B, N) cosine similarity of the CLS token to each patch token."""
    return F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)


def similarity_map(tokens: torch.Tensor, size: int = 32) -> torch.Tensor:
    """CLS-to-patch similarity as a square grid, bilinearly upsampled to (B, size, size)."""
    sim = cls_patch_similarity(tokens)
    side = int(sim.shape[1] ** 0.5)
    grid = sim.view(-1, 1, side, side)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def token_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, T) cosine similarity of every token with every token."""
    t = F.normalize(tokens, dim=-1)
    return t @ t.transpose(1, 2)


def focus(sim: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per map: entropy of softmax(sim) over the N patches (lower = more focused) and the share of
    its mass in the top k patches (higher = more focused)."""
    p = sim.softmax(dim=-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return entropy, p.topk(k, dim=-1).values.sum(-1)
