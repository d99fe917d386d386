"""Pre-norm Vision Transformer (Dosovitskiy et al. 2021) with a timm-like feature API.

Reads top to bottom: Attention -> Mlp -> Block -> ConvStem -> VisionTransformer. Every consumer (probe,
fine-tune, video, fusion, analysis) goes through `forward_features`, `forward_intermediates`,
`forward_head` and `forward_cls` (the CLS output alone, computed without the last block's other
tokens); none reaches into the blocks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    """Encoder shape; saved inside every checkpoint so a model can be rebuilt from it alone."""

    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # patch: one linear map per 8x8 patch (ViT) | conv: a stack of 3x3 stride-2 convolutions, one per
    # halving of the patch, then a 1x1 (Xiao et al. 2021, "Early convolutions help transformers see better");
    # either way one token per patch.
    stem: str = "patch"

    def __post_init__(self):
        from raysslvit.errors import UserError

        if self.patch_size <= 0 or self.img_size % self.patch_size:
            raise UserError(f"patch_size {self.patch_size} does not divide the image size {self.img_size}")
        if self.stem not in ("patch", "conv"):
            raise UserError(f"unknown stem {self.stem!r}: use patch or conv")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise UserError(f"the conv stem needs a patch size that is a power of 2, got {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1:
            raise UserError(f"depth must be at least 1, got {self.depth}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """All tokens attend to all; with `queries`, only the first `queries` tokens are computed
        (every token still a key and value): (B, queries, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hs)
        if queries is not None:
            q = q[:, :, :queries]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drops a whole residual branch."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block; `attn_out` exposes the residual stream after attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn_out(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The stream after attention; with `queries`, only at the first `queries` tokens."""
        return x[:, :queries] + self.drop_path(self.attn(self.norm1(x), queries))

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(self.attn_out(x))

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output at the CLS token alone (B, 1, D): all tokens are keys and values, but
        only CLS is a query and goes through the MLP, the other tokens' outputs are never computed."""
        return self.mlp_out(self.attn_out(x, queries=1))


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions with ReLU, one per halving of the patch size, widening to `embed_dim`,
    then a 1x1 convolution: (B, 3, H, W) -> (B, D, H / P, W / P), like the patch embedding it replaces.
    A token's receptive field is 2P - 1 pixels square: its own patch and the P - 1 pixels above and left
    of it. No normalisation, so it computes the same in train and eval mode."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        n = patch_size.bit_length() - 1  # stride-2 convolutions
        widths = [in_chans] + [max(embed_dim >> (n - 1 - i), 8) for i in range(n)]
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers, nn.Conv2d(widths[-1], embed_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class VisionTransformer(nn.Module):
    """CLS token + learned positions + pre-norm blocks + final norm. Token 0 is CLS."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.embed_dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=P, stride=P) if cfg.stem == "patch" else ConvStem(P, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(D)
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @property
    def num_layers(self) -> int:
        """Layer ids for layer-wise lr decay: 0 the embedding, 1..depth the blocks, depth + 1 above."""
        return len(self.blocks) + 2

    def layer_of(self, name: str) -> int:
        """The layer id of one of this encoder's parameters (timm's `group_matcher`, as one call)."""
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers - 1

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1 + N, D) tokens entering the first block."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed output tokens (B, 1 + N, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Residual stream at every depth, for probes and analysis.

        `blocks[i]` is the (un-normed) output of block i, `inputs[i]` what entered it,
        `attn[i]` the stream after block i's attention sub-layer; `final` = forward_features.
        """
        x = self.embed(x)
        inputs, attn, blocks = [], [], []
        for blk in self.blocks:
            inputs.append(x)
            a = blk.attn_out(x)
            attn.append(a)
            x = blk.mlp_out(a)
            blocks.append(x)
        return {"inputs": inputs, "attn": attn, "blocks": blocks, "final": self.norm(x)}

    def forward_head(self, tokens: torch.Tensor, head: nn.Module | None = None, pre_logits: bool = False):
        """CLS pooling of the tokens of `forward_features`, then `head` unless pre_logits."""
        cls = tokens[:, 0]
        return cls if pre_logits or head is None else head(cls)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The normed CLS output (B, D), equal to `forward_features(x)[:, 0]` but cheaper: the last
        block computes CLS only, which saves most of that block (about 1/depth of the encoder)."""
        x = self.embed(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.norm(self.blocks[-1].forward_cls(x)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS output, what classifiers and the video model's frames use."""
        return self.forward_cls(x)


class Classifier(nn.Module):
    """An encoder with a new linear head on its CLS output (fine-tuning, frame classifiers)."""

    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_cls(x))
