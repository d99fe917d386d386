"""Shared fixtures: a real local Ray (2 CPUs) and the path of the JPEG copy of CIFAR-10, if present."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

JPEG_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg")

needs_jpeg_cifar10 = pytest.mark.skipif(not os.path.isdir(JPEG_CIFAR10),
                                        reason="the JPEG copy of CIFAR-10 is not on this machine")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`python -m raysslvit run` on the smoke preset, in-process (the Ray tests reuse its M and video models)."""
    from raysslvit.__main__ import main

    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--out", str(out), "--launcher", "local"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict:
    """Tiny randomly initialised BLIP (transformers) and CLIP (open_clip) saved as local folders, as
    a user with real weights would pass them: {"blip": folder, "clip": "local-dir:folder", "clip_dim"}."""
    import open_clip
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    root = tmp_path_factory.mktemp("weights")
    clip_dir, blip_dir = root / "clip", root / "blip"
    clip_dir.mkdir()
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / "configs").mkdir()
    (root / "configs" / "tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), clip_dir / "open_clip_pytorch_model.bin")

    blip_dir.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "the", "on", "grass", "water",
             "dog", "cat", "car", "truck", "ship", "bird", "horse", "frog", "deer", "airplane", "red", "small"]
    (blip_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(vocab=str(blip_dir / "vocab.txt"))  # transformers 5 ignores vocab_file=
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: i for i, w in enumerate(words)}
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"]))
    BlipForConditionalGeneration(config).save_pretrained(blip_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(blip_dir)
    return {"blip": str(blip_dir), "clip": f"local-dir:{clip_dir}", "clip_dim": 24}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raysslvit.launch import start_ray

    start_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def write_space(tmp_path, **changes) -> str:
    """A two-trial study file on the smoke preset, small enough for a test."""
    spec = {"stages": ["ssl", "probe"], "preset": "smoke", "overrides": {"ssl.epochs": 2, "probe.epochs": 3},
            "space": {"ssl.mask_ratio": {"grid": [0.25, 0.5]}}, "metric": "val_knn_acc_tokens",
            "scheduler": {"type": "none"}, **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="session")
def tune_study(tmp_path_factory):
    """A real two-trial Tune study, interrupted with Ctrl-C once its first trial finished, then
    finished with --resume. Returns its folder, the first trial's records before the resume, and
    the resumed run."""
    tmp = tmp_path_factory.mktemp("tune")
    root = os.path.join(os.path.dirname(__file__), "..")
    args = [sys.executable, "-m", "raysslvit.tune", "--space", write_space(tmp), "--storage-path", str(tmp / "t")]
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = lambda: [p for p in glob.glob(str(tmp / "t" / "study" / "trial_*" / "result.json"))
                        if "stages_done" in open(p).read()]
    deadline = time.time() + 300
    while not finished():
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be interrupted"
        time.sleep(0.5)
    first = finished()[0]
    records = open(first).read()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    resumed = subprocess.run([*args, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return {"path": tmp / "t" / "study", "first_trial": first, "first_records": records, "resumed": resumed}
