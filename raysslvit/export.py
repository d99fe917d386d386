"""`python -m raysslvit export --out RUN --stage ssl|finetune TARGET`: a trained encoder for timm.

TARGET gets `model.safetensors` (timm's `VisionTransformer` parameter names), `config.json`
(timm's model arguments and preprocessing, as timm's own exports lay them out) and `README.md`, a
model card (data, recipe, figures with the command that made them). Our ViT computes what timm's
does (pre-norm blocks, CLS token, learned positions, final norm, LayerNorm eps 1e-5); the conv stem
travels as `ConvStemEmbed`, timm's `embed_layer`.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from raysslvit.artifacts import atomic_path, read_json, write_json
from raysslvit.data import CIFAR10_CLASSES, MEAN, STD
from raysslvit.errors import UserError
from raysslvit.stages.common import read_checkpoint
from raysslvit.vit import ConvStem, ViTConfig

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
NORM_EPS = 1e-5  # torch's LayerNorm default, ours; timm's own default is 1e-6


class ConvStemEmbed(nn.Module):
    """Our conv stem as timm's `embed_layer`: (B, 3, H, W) -> (B, N, D) tokens; the convolutions
    are `proj`, where timm's patch embedding keeps its one."""

    def __init__(self, img_size=32, patch_size=8, in_chans=3, embed_dim=768, bias=True, dynamic_img_pad=False, **_):
        super().__init__()
        size = img_size if isinstance(img_size, int) else img_size[0]
        self.img_size, self.patch_size = (size, size), (patch_size, patch_size)
        self.grid_size = (size // patch_size, size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = ConvStem(patch_size, embed_dim, in_chans).convs

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def timm_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """A raysslvit model.pt's weights under timm's names: the encoder's (its patch embedding as
    `patch_embed.proj`) and a classifier's `head`; SSL heads are left out."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            name = key.removeprefix("encoder.")
            if name.startswith("patch_embed."):
                name = "patch_embed.proj." + name.removeprefix("patch_embed.").removeprefix("convs.")
            out[name] = value.contiguous()
        elif key.startswith("head."):
            out[key] = value.contiguous()
    return out


def timm_config(model: ViTConfig, num_classes: int, stage: str) -> dict:
    """timm's `model_args` and `pretrained_cfg`, and what timm needs besides them."""
    args = {"img_size": model.img_size, "patch_size": model.patch_size, "embed_dim": model.embed_dim,
            "depth": model.depth, "num_heads": model.num_heads, "mlp_ratio": model.mlp_ratio,
            "num_classes": num_classes, "global_pool": "token", "class_token": True}
    return {"architecture": "vit_raysslvit", "num_classes": num_classes, "num_features": model.embed_dim,
            "global_pool": "token", "model_args": args,
            "pretrained_cfg": {"input_size": [3, model.img_size, model.img_size], "interpolation": "bicubic",
                               "crop_pct": 1.0, "mean": list(MEAN), "std": list(STD), "first_conv": "patch_embed.proj",
                               "classifier": "head", "num_classes": num_classes},
            "label_names": CIFAR10_CLASSES if num_classes else [],
            "raysslvit": {"stage": stage, "stem": model.stem, "norm_eps": NORM_EPS,
                          "embed_layer": "raysslvit.export.ConvStemEmbed" if model.stem == "conv" else None}}


def timm_model(folder: str):
    """timm's VisionTransformer with an export's weights."""
    from functools import partial

    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    cfg = read_json(os.path.join(folder, CONFIG))
    extra = {"embed_layer": ConvStemEmbed} if cfg["raysslvit"]["stem"] == "conv" else {}
    model = VisionTransformer(**cfg["model_args"], norm_layer=partial(nn.LayerNorm, eps=cfg["raysslvit"]["norm_eps"]),
                              **extra)
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS)))
    return model


def _command(recorded: str) -> str:
    """The command line as a user types it (provenance records argv, its first item a path)."""
    head, _, rest = recorded.partition(" ")
    return f"python -m raysslvit {rest}" if head.endswith("__main__.py") else recorded


def _figures(metrics: dict) -> str:
    return "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()
                     if k.startswith(("val_", "test_")) and isinstance(v, float))


def model_card(stage: str, run: dict, metrics: dict, probe: dict | None) -> str:
    """README.md of an export: what the weights are, how they were made, what they score."""
    cfg, data, model = run["config"], run["config"]["data"], run["config"]["model"]
    source = data["data_dir"] or {"sample": "the embedded CIFAR-10 sample (250 train + 50 test images per class)",
                                  "cifar10": "CIFAR-10 (torchvision)"}.get(data["data"], data["data"])
    what = ("model M: the encoder pretrained by the masked + rotated patch task (no labels); its SSL heads are "
            "left out, so the model's output is the CLS feature" if stage == "ssl" else
            "the encoder fine-tuned on CIFAR-10 with a linear head on CLS: the model's output is the 10 logits")
    lines = [f"# raysslvit {stage}: ViT dim {model['embed_dim']}, depth {model['depth']}, {model['stem']} stem",
             "", f"{what}.", "",
             "## Load", "", "```python", "from raysslvit.export import timm_model",
             "model = timm_model(\"THIS_FOLDER\").eval()  # timm's VisionTransformer",
             "tokens = model.forward_features(images)  # (B, 1 + N, D); images 32x32, normalised by the mean and std of config.json",
             "```", "",
             "Without raysslvit (patch stem): `timm.models.vision_transformer.VisionTransformer(**model_args, "
             f"norm_layer=partial(torch.nn.LayerNorm, eps={NORM_EPS}))`, then `load_state_dict(safetensors.torch.load_file"
             "(\"model.safetensors\"))`. The conv stem needs `embed_layer=raysslvit.export.ConvStemEmbed`.", "",
             "## Data", "", f"{source}; {int(data['val_fraction'] * 100)} % of train held out as val "
             f"(split seed {data['split_seed']}) for every choice, the test split only for the figures below.", "",
             "## Recipe", "", "```json", json.dumps({"model": model, stage: cfg[stage], "seed": run["seed"]}, indent=1),
             "```", "", "## Figures", "", f"Made by `{_command(run.get('command', ''))}` (git {run.get('git_commit')}, "
             f"{run.get('time')}, {run.get('hardware', {}).get('cpu')}).", "", "| figure | value |", "| --- | --- |",
             _figures(metrics)]
    if probe:
        lines += ["", "Linear probes of these weights (the `probe` stage of the same run):", "",
                  "| figure | value |", "| --- | --- |", _figures(probe)]
    return "\n".join(lines) + "\n"


def _probe_of(folder: str, model_path: str) -> dict | None:
    """The probe's figures of the run, where it probed these weights."""
    try:
        probed = read_json(os.path.join(folder, "config.json"))["inputs"].get("checkpoint")
        return read_json(os.path.join(folder, "metrics.json")) if probed == os.path.abspath(model_path) else None
    except (OSError, KeyError, ValueError, AttributeError):
        return None


def export(out: str, stage: str, target: str) -> str:
    """The stage's model.pt of the run folder `out`, written into `target` for timm."""
    from safetensors.torch import save_file

    folder = os.path.join(out, stage)
    model_path = os.path.join(folder, "model.pt")
    if not os.path.isfile(model_path):
        raise UserError(f"nothing to export: {model_path} not found (run `python -m raysslvit {stage} --out {out}` first)")
    saved = read_checkpoint(model_path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"export target {target} is a file, not a folder")
    weights = timm_state_dict(saved["state_dict"])
    num_classes = weights["head.weight"].shape[0] if "head.weight" in weights else 0
    cfg = timm_config(ViTConfig(**saved["model_config"]), num_classes, stage)
    probe = _probe_of(os.path.join(out, "probe"), model_path) if stage == "ssl" else None
    card = model_card(stage, read_json(os.path.join(folder, "config.json")), read_json(os.path.join(folder, "metrics.json")),
                      probe)
    os.makedirs(target, exist_ok=True)
    with atomic_path(os.path.join(target, WEIGHTS)) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})
    write_json(os.path.join(target, CONFIG), cfg)
    with atomic_path(os.path.join(target, CARD)) as tmp, open(tmp, "w") as f:
        f.write(card)
    return target
