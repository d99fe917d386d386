"""What the stages share: the data on the worker's device and the encoder from a checkpoint."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from raysslvit.config import Config
from raysslvit.data import Splits, load_splits
from raysslvit.errors import UserError
from raysslvit.vit import ViTConfig, VisionTransformer


def load_data(cfg: Config, device=None) -> Splits:
    d = cfg.data
    splits = load_splits(d.data, d.data_dir, d.data_root, d.val_fraction, d.split_seed)
    return splits.to(device) if device is not None else splits


def encoder_path(cfg: Config, default_stage: str = "ssl") -> str:
    """--checkpoint, or this run's model M; a clear error when it does not exist."""
    path = cfg.checkpoint or os.path.join(cfg.out_dir, default_stage, "model.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (run `python -m raysslvit {default_stage}` first "
                        f"or pass --checkpoint PATH)")
    return path


def read_checkpoint(path: str) -> dict:
    """A raysslvit model.pt: {"stage", "model_config", "state_dict"}; a clear error otherwise."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
        ViTConfig(**saved["model_config"]), saved["state_dict"], saved["stage"]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"not a raysslvit checkpoint: {path} ({type(e).__name__})") from None
    return saved


def load_encoder(path: str, **changes) -> VisionTransformer:
    """The encoder of any raysslvit model.pt (its config travels with it), optionally reconfigured
    (e.g. drop_path for fine-tuning)."""
    saved = read_checkpoint(path)
    encoder = VisionTransformer(replace(ViTConfig(**saved["model_config"]), **changes))
    weights = {k.removeprefix("encoder."): v for k, v in saved["state_dict"].items() if k.startswith("encoder.")}
    if not weights:
        raise UserError(f"{path} holds no encoder (it is a {saved['stage']} result)")
    encoder.load_state_dict(weights)
    return encoder
