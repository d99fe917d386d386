"""Export: our encoder in timm's VisionTransformer computes what ours does, on both stems."""
import json
from functools import partial

import pytest
import torch
import torch.nn as nn

from raysslvit.export import ConvStemEmbed, timm_model, timm_state_dict
from raysslvit.stages.common import encoder_from, read_checkpoint
from raysslvit.vit import Classifier, ViTConfig, VisionTransformer

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def test_the_conv_stem_passed_as_embed_layer_gives_our_features_and_logits():
    torch.manual_seed(0)
    ours = Classifier(VisionTransformer(ViTConfig(embed_dim=64, depth=2, num_heads=2, stem="conv")), 10).eval()
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                                        embed_layer=ConvStemEmbed, norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    theirs.load_state_dict(timm_state_dict({**{f"encoder.{k}": v for k, v in ours.encoder.state_dict().items()},
                                            **{f"head.{k}": v for k, v in ours.head.state_dict().items()}}))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.encoder.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", ["ssl", "finetune"])
def test_an_export_loads_into_timm_and_matches(stage, smoke_run, tmp_path):
    """The CLI on the smoke study's model: timm's model with the export's weights gives our tokens,
    and for the fine-tuned one our logits (for M, its CLS feature); the card names the command."""
    from raysslvit.__main__ import main

    assert main(["export", "--out", str(smoke_run), "--stage", stage, str(tmp_path / "exp")]) == 0
    saved = read_checkpoint(str(smoke_run / stage / "model.pt"))
    encoder = encoder_from(saved).eval()
    model = timm_model(str(tmp_path / "exp")).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder.forward_features(x), rtol=0, atol=1e-5)
        if stage == "finetune":
            head = nn.Linear(encoder.embed_dim, 10)
            head.load_state_dict({k.removeprefix("head."): v for k, v in saved["state_dict"].items() if k.startswith("head.")})
            torch.testing.assert_close(model(x), head(encoder(x)), rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(model(x), encoder(x), rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["num_classes"] == (10 if stage == "finetune" else 0) and cfg["raysslvit"]["stage"] == stage
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "Made by `" in card and "| test_acc |" in card  # M's card: its probe's figures


def test_an_export_without_a_model_is_one_line(tmp_path, capsys):
    from raysslvit.__main__ import main

    assert main(["export", "--out", str(tmp_path), "--stage", "ssl", str(tmp_path / "exp")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "exp").exists()
