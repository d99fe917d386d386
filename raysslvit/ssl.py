"""The study's self-supervised task: masked + rotated patches, and its losses.

For every image a random subset A of the patches is chosen; part of A is blacked out (the
reconstruction task, as in MAE, He et al. 2022) and the rest of A is rotated in place by one
angle per image (the rotation task, after RotNet, Gidaris et al. 2018). All batched, no loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysslvit.data import normalize


@dataclass
class Corruption:
    images: torch.Tensor  # (B, 3, H, W) uint8, corrupted
    masked_idx: torch.Tensor  # (B, M) patch indices blacked out
    rotated_idx: torch.Tensor  # (B, R) patch indices rotated
    rot_label: torch.Tensor  # (B,) angle / 90 degrees, in {0, 1, 2, 3}
    targets: torch.Tensor  # (B, M, 3, P, P) uint8 original pixels of the masked patches


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, p, p), patches in row-major order (the ViT token order)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)


def unpatchify(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify` for an image of h x w patches."""
    B, N, C, p, _ = patches.shape
    return patches.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)


def split_counts(num_patches: int, subset_ratio: float, mask_ratio: float) -> tuple[int, int]:
    """(masked, rotated) patch counts per image."""
    subset = round(subset_ratio * num_patches)
    masked = round(mask_ratio * subset)
    return masked, subset - masked


def corrupt(x: torch.Tensor, patch_size: int = 8, subset_ratio: float = 0.5, mask_ratio: float = 0.5,
            generator: torch.Generator | None = None) -> Corruption:
    """Black out and rotate random patches of a uint8 batch, independently per image."""
    B, C, H, W = x.shape
    patches = patchify(x, patch_size)  # (B, N, C, p, p)
    N = patches.shape[1]
    n_mask, n_rot = split_counts(N, subset_ratio, mask_ratio)
    order = torch.rand(B, N, device=x.device, generator=generator).argsort(dim=1)
    masked_idx, rotated_idx = order[:, :n_mask], order[:, n_mask:n_mask + n_rot]
    rot_label = torch.randint(0, 4, (B,), device=x.device, generator=generator)

    gather = lambda idx: patches.gather(1, idx[:, :, None, None, None].expand(-1, -1, C, patch_size, patch_size))
    targets = gather(masked_idx)
    chosen = gather(rotated_idx)  # (B, R, C, p, p)
    all_angles = torch.stack([torch.rot90(chosen, k, dims=(-2, -1)) for k in range(4)])  # (4, B, R, C, p, p)
    rotated = all_angles[rot_label, torch.arange(B, device=x.device)]

    out = patches.clone()
    expand = lambda idx: idx[:, :, None, None, None].expand(-1, -1, C, patch_size, patch_size)
    out.scatter_(1, expand(masked_idx), torch.zeros_like(targets))
    out.scatter_(1, expand(rotated_idx), rotated)
    images = unpatchify(out, H // patch_size, W // patch_size)
    return Corruption(images, masked_idx, rotated_idx, rot_label, targets)


def recon_targets(targets: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """uint8 (B, M, C, p, p) -> float (B, M, C*p*p) in normalised pixel space (optionally per patch)."""
    t = normalize(targets).flatten(2)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    return t


class SSLHeads(nn.Module):
    """Encoder + rotation head (Linear on CLS) + reconstruction head (Linear on masked tokens)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        D, p = encoder.embed_dim, encoder.cfg.patch_size
        self.encoder = encoder
        self.rot_head = nn.Linear(D, 4)
        self.recon_head = nn.Linear(D, 3 * p * p)

    def forward(self, x: torch.Tensor, masked_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder.forward_features(x)  # (B, 1 + N, D)
        rot_logits = self.rot_head(tokens[:, 0])
        patch_tokens = tokens[:, 1:].gather(1, masked_idx[:, :, None].expand(-1, -1, tokens.shape[-1]))
        return rot_logits, self.recon_head(patch_tokens)  # (B, 4), (B, M, 3*p*p)


def masked_rotation_loss(rot_logits, rot_label, recon, target, recon_weight: float) -> tuple[torch.Tensor, dict]:
    """Rotation cross-entropy + recon_weight * reconstruction MSE; also returns the parts."""
    ce = F.cross_entropy(rot_logits, rot_label)
    mse = F.mse_loss(recon, target) if target.numel() else rot_logits.new_zeros(())
    return ce + recon_weight * mse, {"rot_ce": ce.detach(), "recon_mse": mse.detach()}


# --- The InfoNCE baseline the study compared against (SimCLR, Chen et al. 2020) -----------------


class ContrastiveHeads(nn.Module):
    """Encoder + projection MLP on the CLS output; the encoder is what gets probed."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 128):
        super().__init__()
        D = encoder.embed_dim
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """NT-Xent: each view must pick its partner among the other 2B - 1 views of the batch.
    Under DDP the negatives are the worker's own batch (no all-gather)."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    return loss, {"pair_acc": (sim.argmax(1) == target).float().mean().detach()}
