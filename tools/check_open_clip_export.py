"""Checks an export against open_clip: the same embeddings from open_clip's loader as from
clipjax's, on random images and the run's own captions. Prints the largest differences.

Needs torch and open_clip next to clipjax's requirements, so CI never runs it:

  pip install -r requirements.txt torch open_clip_torch
  python -m clipjax.export --workdir=/tmp/clip_local --output=/tmp/clip_export
  python tools/check_open_clip_export.py --export=/tmp/clip_export [--workdir=/tmp/clip_local]

With --workdir it also compares with the run's checkpoint as clipjax loads it.
"""

import argparse

import numpy as np
import open_clip
import torch

import clipjax

CAPTIONS = ["a red circle on the left.", "two small blue squares", "a green triangle!", ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()

    exported = clipjax.load(args.export)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{args.export}")
    model.eval()
    size = exported.image_size
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    pixels = np.stack([exported.preprocess(image) for image in images])
    tokens = exported.tokenize(CAPTIONS)
    with torch.no_grad():
        torch_images = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2), True)
        torch_texts = model.encode_text(torch.from_numpy(tokens).long(), True)
    diffs = {
        "images: open_clip vs clipjax (export)": np.abs(
            torch_images.numpy() - exported.encode_image(pixels)
        ).max(),
        "texts: open_clip vs clipjax (export)": np.abs(
            torch_texts.numpy() - exported.encode_text(tokens)
        ).max(),
        "logit_scale: open_clip vs clipjax (export)": abs(
            model.logit_scale.exp().item() - exported.logit_scale
        ),
    }
    if args.workdir:
        trained = clipjax.load(args.workdir)
        diffs["images: open_clip vs clipjax (workdir)"] = np.abs(
            torch_images.numpy() - trained.encode_image(pixels)
        ).max()
        diffs["texts: open_clip vs clipjax (workdir)"] = np.abs(
            torch_texts.numpy() - trained.encode_text(tokens)
        ).max()
    for name, value in diffs.items():
        print(f"{name}: max abs diff {value:.3g}")


if __name__ == "__main__":
    main()
