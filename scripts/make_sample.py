"""Build the embedded CIFAR-10 sample (raysslvit/assets/cifar10_sample.zip) from an ImageFolder tree.

    python scripts/make_sample.py ../shared/datasets/cifar10-jpeg

Picks a seeded 250 train + 50 test images per class and stores their JPEG bytes unchanged.
"""
import argparse
import os
import random
import zipfile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("src", help="ImageFolder tree with train/<class>/ and test/<class>/")
parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "raysslvit", "assets", "cifar10_sample.zip"))
parser.add_argument("--train", type=int, default=250)
parser.add_argument("--test", type=int, default=50)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

rng = random.Random(args.seed)
with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_STORED) as z:
    for split, count in (("train", args.train), ("test", args.test)):
        for cls in sorted(os.listdir(os.path.join(args.src, split))):
            names = sorted(os.listdir(os.path.join(args.src, split, cls)))
            for name in sorted(rng.sample(names, count)):
                z.write(os.path.join(args.src, split, cls, name), f"{split}/{cls}/{name}")
print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
