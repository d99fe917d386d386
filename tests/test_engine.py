"""The Ray-free fit loop: schedule, optimiser groups, exact resume."""
import math

import pytest
import torch

from raysslvit.config import build_config
from raysslvit.engine import WorkerContext, fit, lr_at, param_groups
from raysslvit.stages.common import load_data
from raysslvit.stages.finetune import ClassificationTask
from raysslvit.vit import Classifier, ViTConfig, VisionTransformer


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_param_groups_skip_decay_and_scale_layers():
    model = Classifier(VisionTransformer(ViTConfig(embed_dim=32, depth=2, num_heads=2)), 10)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["encoder.pos_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.blocks.0.norm1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["encoder.blocks.1.mlp.fc1.weight"])]["lr_scale"] == 0.5
    assert by_param[id(named["encoder.patch_embed.weight"])]["lr_scale"] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)


class Crash(Exception):
    pass


def test_fit_resumes_from_its_checkpoint():
    cfg = build_config("smoke", {"finetune.epochs": 3, "finetune.warmup_epochs": 0})
    splits = load_data(cfg)
    make_task = lambda: (torch.manual_seed(0), ClassificationTask(cfg.finetune, Classifier(VisionTransformer(cfg.model), 10)))[1]
    saved = []

    def crash_after_two(metrics, state):
        saved.append(state)
        if metrics["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        fit(make_task(), splits, cfg.finetune, WorkerContext(), crash_after_two)
    reports = []
    final = fit(make_task(), splits, cfg.finetune, WorkerContext(), lambda m, s: reports.append(m), resume=saved[-1])
    assert [m["epoch"] for m in reports] == [3]  # only the missing epoch ran
    assert [m["epoch"] for m in final["history"]] == [1, 2, 3]
    whole = fit(make_task(), splits, cfg.finetune, WorkerContext(), lambda m, s: None)
    untimed = lambda m: {k: v for k, v in m.items() if k not in ("epoch_time_s", "history")}
    assert untimed(final) == untimed(whole)  # the resumed run ends as the uninterrupted one, test figure too
    best = final["history"][final["best_val_epoch"] - 1]
    assert final["val_acc"] == best["val_acc"] == max(m["val_acc"] for m in final["history"])  # the test's epoch
    assert final["train_loss"] == final["history"][-1]["train_loss"] and not math.isnan(final["train_loss"])


def test_layer_ids_come_from_the_encoder_wherever_it_sits():
    """The fusion model nests M under video.encoder: its blocks get their layer's lr scale, the temporal
    blocks, the text projection and the cross-attention block sit above the encoder (scale 1)."""
    from raysslvit.fusion import FusionTransformer
    from raysslvit.video import VideoTransformer

    model = FusionTransformer(VideoTransformer(VisionTransformer(ViTConfig(embed_dim=32, depth=2, num_heads=2)), 10,
                                               clip_len=4, st_blocks=1), text_dim=8)
    by_param = {id(p): g for g in param_groups(model, 0.05, layer_decay=0.5) for p in g["params"]}
    scale = lambda name: by_param[id(dict(model.named_parameters())[name])]["lr_scale"]
    assert scale("video.encoder.patch_embed.weight") == 0.125 and scale("video.encoder.blocks.0.mlp.fc1.weight") == 0.25
    assert scale("video.temporal_blocks.0.mlp.fc1.weight") == 1.0 and scale("cross.mlp.fc1.weight") == 1.0
    assert scale("text_proj.weight") == 1.0 and scale("video.head.weight") == 1.0
