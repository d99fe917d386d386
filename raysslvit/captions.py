"""Captions for every image: BLIP writes them, CLIP embeds them, Ray Data runs both in parallel.

The pipeline is two `map_batches` stages on actor pools (each actor loads its model once; one GPU
per actor when Ray has GPUs): BLIP (transformers) captions the images, then an open_clip text
encoder embeds the captions. Rows are keyed by the image's stable id (`Splits.image_ids`).

Weights are found before Ray starts (`resolve_weights`): a local folder, the Hugging Face cache,
or a download; offline without them, one line says which weights are missing and how to supply them.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile

import numpy as np

from raysslvit.config import CaptionsConfig
from raysslvit.errors import UserError

# Words a caption may use for a CIFAR-10 class: `label_word_rate` counts captions naming their class.
SYNONYMS = {
    "airplane": ["airplane", "aeroplane", "plane", "jet", "aircraft", "airliner", "jetliner"],
    "automobile": ["automobile", "car", "sedan", "taxi", "suv", "convertible", "coupe", "hatchback"],
    "bird": ["bird", "ostrich", "emu", "parrot", "eagle", "hawk", "owl", "duck", "chicken", "rooster", "hen",
             "sparrow", "pigeon", "swan", "goose", "penguin", "peacock", "heron", "crane", "finch", "robin"],
    "cat": ["cat", "kitten", "kitty"],
    "deer": ["deer", "elk", "moose", "antelope", "fawn", "reindeer", "stag", "gazelle"],
    "dog": ["dog", "puppy", "pup", "hound"],
    "frog": ["frog", "toad", "tadpole"],
    "horse": ["horse", "pony", "foal", "stallion", "mare"],
    "ship": ["ship", "boat", "vessel", "yacht", "ferry", "freighter", "tanker", "sailboat", "steamer", "liner"],
    "truck": ["truck", "lorry", "pickup", "tractor", "trailer", "semi"],
}

HOW_TO_SUPPLY = ("go online once (the weights are then cached), or pass a local folder "
                 "(--blip-model PATH, --clip-model local-dir:PATH)")


def label_word_rate(captions: list[str], labels: list[int], classes: list[str]) -> float:
    """Share of captions that contain their class's name or a listed synonym (plural allowed)."""
    patterns = [re.compile(r"\b(" + "|".join(map(re.escape, SYNONYMS.get(c, [c]))) + r")(s|es)?\b", re.IGNORECASE)
                for c in classes]
    hits = sum(bool(patterns[y].search(text)) for text, y in zip(captions, labels))
    return hits / max(1, len(captions))


# --- finding the weights ----------------------------------------------------------------------------


class _Missing(Exception):
    """Weights that are neither local nor downloadable; `resolve_weights` names all of them at once."""


def _hub_reachable() -> bool:
    """Whether a download may be tried: not with HF_HUB_OFFLINE=1, nor when the hub's name does not
    resolve (huggingface_hub would retry for a minute per file before giving up)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def _hub_snapshot(repo_id: str, what: str) -> str:
    """A hub repo's local folder: the cache first, then a download."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise _Missing(f"{what} {repo_id!r}")
    try:
        return snapshot_download(repo_id)
    except Exception as e:
        raise _Missing(f"{what} {repo_id!r} ({type(e).__name__})") from None


def resolve_blip(name: str) -> str:
    """The local folder holding BLIP's weights and processor."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"BLIP folder {name} has no config.json (expected a save_pretrained folder)")
        return os.path.abspath(name)
    if name.startswith((".", "/", "~")):
        raise UserError(f"BLIP folder not found: {name}")
    return _hub_snapshot(name, "BLIP")


def resolve_clip(name: str, pretrained: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained file or None) that load without the network."""
    import open_clip
    from huggingface_hub import hf_hub_download

    if name.startswith("local-dir:"):
        folder = os.path.abspath(os.path.expanduser(name.removeprefix("local-dir:")))
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise UserError(f"CLIP folder {folder} has no open_clip_config.json (expected an open_clip local-dir folder)")
        return f"local-dir:{folder}", None
    if name.startswith("hf-hub:"):
        return f"local-dir:{_hub_snapshot(name.removeprefix('hf-hub:'), 'CLIP')}", None
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r}: use a name from open_clip.list_models(), local-dir:PATH or hf-hub:ID")
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if not tag.get("hf_hub"):
        raise UserError(f"open_clip has no hub weights {pretrained!r} for {name}: "
                        f"use a tag of open_clip.list_pretrained_tags_by_model({name!r}), or local-dir:PATH")
    repo, filename = os.path.split(tag["hf_hub"])  # 'org/repo/' or 'org/repo/file' (open_clip's convention)
    for candidate in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
        try:
            return name, hf_hub_download(repo, candidate, local_files_only=True)
        except Exception:
            pass
    if not _hub_reachable():
        raise _Missing(f"CLIP {name}/{pretrained} ({repo})")
    try:
        return name, open_clip.pretrained.download_pretrained(tag)
    except Exception as e:
        raise _Missing(f"CLIP {name}/{pretrained} ({type(e).__name__})") from None


def resolve_weights(c: CaptionsConfig) -> dict:
    """Where both models' weights are, found before any Ray actor starts; one line names every
    missing one and how to supply it."""
    found, missing = {}, []
    for key, resolve in (("blip", lambda: resolve_blip(c.blip_model)),
                         ("clip", lambda: resolve_clip(c.clip_model, c.clip_pretrained))):
        try:
            found[key] = resolve()
        except _Missing as e:
            missing.append(str(e))
    if missing:
        raise UserError(f"weights missing for {' and '.join(missing)}: the hub is unreachable or they failed to "
                        f"download; {HOW_TO_SUPPLY}")
    return {"blip": found["blip"], "clip": found["clip"][0], "clip_file": found["clip"][1]}


def _weight_files(path: str) -> list[str]:
    """A weights file, or every file under a weights folder, in a fixed order."""
    return [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)


def _file_identity(path: str) -> list:
    """A weights file's content, cheaply: the Hugging Face cache names each blob by its hash (a new
    download of the same weights is the same blob); any other file, by its size and mtime."""
    real = os.path.realpath(path)
    if os.path.basename(os.path.dirname(real)) == "blobs":
        return [os.path.basename(real)]
    return [os.path.getsize(path), os.stat(path).st_mtime_ns]


def weights_identity(weights: dict) -> dict:
    """What identifies the weights in a fingerprint: each local file's path and `_file_identity`
    (hashing gigabytes of weights on every call would cost more than a stage)."""
    ident = {}
    for key in ("blip", "clip", "clip_file"):
        where = weights[key]
        path = where.removeprefix("local-dir:") if where else where
        if path and os.path.exists(path):
            ident[key] = [[os.path.relpath(f, os.path.dirname(path)), *_file_identity(f)]
                          for f in _weight_files(path)]  # lists: the fingerprint is compared after a JSON round trip
        else:
            ident[key] = where
    return ident


# --- the Ray Data actors ------------------------------------------------------------------------------


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _read_files(path: str) -> dict[str, bytes]:
    """A weights file or folder as {path relative to its parent: content}."""
    out = {}
    for f in _weight_files(path):
        with open(f, "rb") as fh:
            out[os.path.relpath(f, os.path.dirname(path))] = fh.read()
    return out


def ship(weights: dict) -> dict:
    """For actors on nodes that do not see the driver's disk: each weights path's files, put in Ray's
    object store once (each in a list, so that Ray hands an actor the reference, not the bytes),
    and the driver's node, whose actors read the files where they are."""
    import ray

    paths = [weights["blip"], weights["clip"].removeprefix("local-dir:"), weights["clip_file"]]
    return {"node": _node(), "files": {p: [ray.put(_read_files(p))] for p in paths if p and os.path.exists(p)}}


@contextlib.contextmanager
def on_this_node(path: str | None, shipped: dict):
    """`path` where this actor can read it while it loads: the driver's own path on the driver's
    node (or when nothing was shipped: one node), else a copy of the shipped files in a folder of
    this node's own, removed once loaded."""
    if not path or path not in shipped.get("files", {}) or _node() == shipped["node"]:
        yield path
        return
    import ray

    with tempfile.TemporaryDirectory(prefix="raysslvit-weights-") as root:
        for rel, content in ray.get(shipped["files"][path][0]).items():
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            with open(os.path.join(root, rel), "wb") as f:
                f.write(content)
        yield os.path.join(root, os.path.basename(path))


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class Captioner:
    """BLIP on one actor: a batch of uint8 images (N, 32, 32, 3) -> their captions."""

    def __init__(self, folder: str, max_new_tokens: int, use_gpu: bool, shipped: dict):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device, self.node = _device(use_gpu), _node()
        with on_this_node(folder, shipped) as here:
            self.processor = BlipProcessor.from_pretrained(here)
            self.model = BlipForConditionalGeneration.from_pretrained(here).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.no_grad = torch.no_grad

    def __call__(self, batch: dict) -> dict:
        with self.no_grad():
            inputs = self.processor(images=list(batch["image"]), return_tensors="pt").to(self.device)
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        captions = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return {"id": batch["id"], "split": batch["split"], "label": batch["label"], "caption": np.array(captions),
                "node": np.array([self.node] * len(captions))}


class TextEncoder:
    """An open_clip text tower on one actor: captions -> L2-normalised embeddings (N, E) float32."""

    def __init__(self, name: str, pretrained: str | None, use_gpu: bool, shipped: dict):
        import open_clip
        import torch

        self.device, self.node = _device(use_gpu), _node()
        folder = name.removeprefix("local-dir:") if name.startswith("local-dir:") else None
        with on_this_node(folder, shipped) as here, on_this_node(pretrained, shipped) as file:
            name = f"local-dir:{here}" if folder else name
            self.model = open_clip.create_model(name, pretrained=file, device=self.device).eval()
            self.tokenizer = open_clip.get_tokenizer(name)
        self.torch = torch

    def __call__(self, batch: dict) -> dict:
        with self.torch.no_grad():
            emb = self.model.encode_text(self.tokenizer(list(batch["caption"])).to(self.device), normalize=True)
        return {**batch, "embedding": list(emb.float().cpu().numpy()), "text_node": np.array([self.node] * len(emb))}


def caption_batches(images: np.ndarray, meta: dict, c: CaptionsConfig, weights: dict, use_gpu: bool):
    """Yield pandas batches (id, split, label, caption, embedding; node and text_node: the Ray nodes of
    the batch's BLIP and CLIP actors) of a Ray Data pipeline over `images` (N, 32, 32, 3) uint8 with
    `meta` columns id / split / label. Ray must be running; on more than one node the weights travel
    through its object store."""
    import pandas as pd
    import ray

    from raysslvit.console import alive_nodes

    shipped = ship(weights) if alive_nodes() > 1 else {}
    cpus = ray.available_resources().get("CPU", 1)
    per_actor = {"num_gpus": 1} if use_gpu else {"num_cpus": max(0.1, min(1.0, cpus / (2 * c.actors)))}
    frame = pd.DataFrame(meta)
    frame["image"] = list(images)
    # enough blocks that every actor gets work while the others run
    blocks = max(1, min(len(frame) // c.batch_size, 8 * c.actors))
    bounds = np.linspace(0, len(frame), blocks + 1).astype(int)
    ds = ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"folder": weights["blip"], "max_new_tokens": c.max_new_tokens,
                                                          "use_gpu": use_gpu, "shipped": shipped},
                        compute=ray.data.ActorPoolStrategy(size=c.actors), batch_size=c.batch_size, **per_actor)
    ds = ds.map_batches(TextEncoder, fn_constructor_kwargs={"name": weights["clip"], "pretrained": weights["clip_file"],
                                                            "use_gpu": use_gpu, "shipped": shipped},
                        compute=ray.data.ActorPoolStrategy(size=c.actors), batch_size=c.batch_size, **per_actor)
    yield from ds.iter_batches(batch_size=None, batch_format="pandas")
