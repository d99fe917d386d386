"""Captions and fusion: the real Ray Data pipeline with tiny random BLIP and CLIP models on the
embedded sample, the fusion stage from a video model, and the cross-attention's wiring.
Figures from tiny random models are a plumbing check, never results."""
import contextlib
import io
import os

import pandas as pd
import pytest
import torch

from raysslvit.captions import label_word_rate, weights_identity
from raysslvit.config import build_config
from raysslvit.fusion import FusionTransformer
from raysslvit.stages import captions, run_command
from raysslvit.stages.common import load_data
from raysslvit.video import VideoTransformer
from raysslvit.vit import ViTConfig, VisionTransformer



def caption_config(out, weights, **more):
    return build_config("smoke", {"out": str(out), "captions.blip_model": weights["blip"],
                                  "captions.clip_model": weights["clip"], "captions.max_new_tokens": 4, **more})


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_weights, ray_local):
    """The pipeline interrupted after its first part, then run again to the end (one table for the
    tests below): what the interruption left, and the finished run's metrics and console."""
    out = tmp_path_factory.mktemp("captions")
    cfg = caption_config(out, tiny_weights, **{"captions.batch_size": 100})
    real, calls = captions._write_part, []

    def crash_after_one(folder, k, batch):
        if calls:
            raise KeyboardInterrupt
        calls.append(k)
        real(folder, k, batch)

    captions._write_part = crash_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            run_command("captions", cfg)
    finally:
        captions._write_part = real
    left = sorted(n for n in os.listdir(out / "captions") if not n.startswith("."))
    parts = os.listdir(out / "captions" / captions.PARTS)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        metrics = run_command("captions", cfg)
    return {"out": out, "metrics": metrics, "left": left, "parts": parts, "console": console.getvalue()}


def test_one_row_per_image_of_every_split(captioned, tiny_weights):
    out, metrics = captioned["out"], captioned["metrics"]
    table = pd.read_parquet(out / "captions" / "captions.parquet")
    splits = load_data(build_config("smoke"))
    for s in ("train", "val", "test"):
        rows = table[table["split"] == s]
        assert sorted(rows["id"]) == sorted(splits.image_ids(s))
        assert (rows.set_index("id").loc[splits.image_ids(s), "label"].to_numpy() == splits.split(s)[1].numpy()).all()
    assert table["id"].is_unique and len(table) == metrics["images"] == 3000
    assert {len(e) for e in table["embedding"]} == {tiny_weights["clip_dim"]} == {metrics["embedding_dim"]}
    assert table["caption"].map(lambda c: isinstance(c, str)).all()  # a random BLIP may write empty ones


def test_a_second_run_reuses_the_cache(captioned, tiny_weights, capsys):
    out = captioned["out"]
    before = os.stat(out / "captions" / "captions.parquet").st_mtime_ns
    run_command("captions", caption_config(out, tiny_weights, **{"captions.actors": 2}))  # speed settings are not the result
    assert "done already" in capsys.readouterr().out
    assert os.stat(out / "captions" / "captions.parquet").st_mtime_ns == before


def test_an_interrupted_run_starts_clean(captioned):
    assert captioned["left"] == [captions.PARTS] and captioned["parts"]  # no table, no fingerprint: not finished
    assert "removing the partial table of an interrupted run" in captioned["console"]
    folder = captioned["out"] / "captions"
    assert captioned["metrics"]["images"] == len(pd.read_parquet(folder / "captions.parquet")) == 3000
    assert not (folder / captions.PARTS).exists()


def test_label_word_rate_counts_class_names_and_synonyms():
    classes = ["automobile", "bird", "cat"]
    assert label_word_rate(["a red car on the road", "two parrots", "a dog", "the cathedral"], [0, 1, 2, 2], classes) == 0.5


def test_fusion_starts_from_its_video_model(tmp_path, smoke_run, captioned):
    out = captioned["out"]
    cfg = build_config("smoke", {"out": str(tmp_path), "launcher": "local", "checkpoint": str(smoke_run / "ssl" / "model.pt"),
                                 "fusion.video_checkpoint": str(smoke_run / "video_2" / "model.pt"),
                                 "fusion.captions": str(out / "captions" / "captions.parquet"), "fusion.epochs": 1})
    metrics = run_command("fusion", cfg)
    for key in ("val_acc", "test_acc", "best_val_epoch", "text_only_test_acc", "shuffled_caption_test_acc",
                "no_caption_test_acc", "label_word_rate"):
        assert metrics[key] is not None, key
    video_test = pd.read_json(smoke_run / "video_2" / "metrics.json", typ="series")["test_acc"]
    assert metrics["no_caption_test_acc"] == pytest.approx(video_test, abs=1e-6)  # the video model it started from


def test_keys_and_values_come_from_the_text():
    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(embed_dim=32, depth=2, num_heads=2))
    model = FusionTransformer(VideoTransformer(encoder, 10, clip_len=4, st_blocks=2), text_dim=24).eval()
    seen = {}
    model.cross.attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(q=args[0], kv=args[1]), with_kwargs=True)
    clips, text = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 24)
    with torch.no_grad():
        base = model(clips, text)
        q, kv = seen["q"], seen["kv"]
        other_text = model(clips, torch.randn(2, 4, 24))
        assert not torch.allclose(base, other_text) and torch.equal(seen["q"], q) and not torch.allclose(seen["kv"], kv)
        model(torch.randn(2, 4, 3, 32, 32), text)
        assert not torch.allclose(seen["q"], q) and torch.equal(seen["kv"], kv)



def test_weights_from_the_hub_cache_are_known_by_their_blobs(tmp_path):
    """A new download of the same weights (same blob hash, new mtime) is the same input; a local
    folder's file is known by its size and mtime."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "9f86d08").write_bytes(b"weights")
    os.symlink(blobs / "9f86d08", snapshot / "model.safetensors")
    weights = {"blip": str(snapshot), "clip": None, "clip_file": None}
    before = weights_identity(weights)
    assert before["blip"] == [["abc123/model.safetensors", "9f86d08"]]
    os.utime(blobs / "9f86d08", (1, 1))
    assert weights_identity(weights) == before
    local = tmp_path / "blip"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"weights")
    ident = weights_identity({"blip": str(local), "clip": None, "clip_file": None})["blip"]
    assert ident == [["blip/model.safetensors", 7, os.stat(local / "model.safetensors").st_mtime_ns]]
