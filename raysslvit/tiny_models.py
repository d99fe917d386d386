"""Tiny randomly initialised BLIP (transformers) and CLIP (open_clip), saved as the local folders a
user with real weights would pass (`--blip-model PATH --clip-model local-dir:PATH`). For tests and
the pipeline benchmark where the hub is out of reach: their captions are noise, a plumbing check."""
from __future__ import annotations

import json
import os

CLIP_CONFIG = {"embed_dim": 24,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "the", "on", "grass", "water",
         "dog", "cat", "car", "truck", "ship", "bird", "horse", "frog", "deer", "airplane", "red", "small"]


def save_tiny_clip(folder: str) -> str:
    """An open_clip local-dir folder; returns `local-dir:<folder>`."""
    import open_clip
    import torch

    os.makedirs(os.path.join(folder, "configs"), exist_ok=True)
    with open(os.path.join(folder, "configs", "tiny-clip.json"), "w") as f:
        json.dump(CLIP_CONFIG, f)
    open_clip.add_model_config(os.path.join(folder, "configs"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": CLIP_CONFIG, "preprocess_cfg": {}}, f)
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return f"local-dir:{folder}"


def save_tiny_blip(folder: str) -> str:
    """A BLIP captioning model and processor saved with save_pretrained; returns the folder."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=vocab)  # transformers 5 ignores vocab_file=
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: i for i, w in enumerate(WORDS)}
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                         # the tiny vocabulary's ids, not BERT's
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"]))
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def save_tiny_caption_models(root: str) -> dict:
    """Both, under `root`: {"blip": folder, "clip": "local-dir:folder", "clip_dim": embedding width}."""
    return {"blip": save_tiny_blip(os.path.join(root, "blip")), "clip": save_tiny_clip(os.path.join(root, "clip")),
            "clip_dim": CLIP_CONFIG["embed_dim"]}
