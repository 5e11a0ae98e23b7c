r"""clipjax's training input against open_clip's webdataset loader, on the same JPEG shards.

Both read the same tar shards of natural-photo JPEGs (quality 90) and make 224 px training
batches of `--batch` images with `--workers` worker processes, on the same cores:

  clipjax:   `python -m clipjax.bench --data_only` on `webdataset:` shards, with the
             `configs/clip_vitb32.py` config (RandomResizedCrop with scale (0.9, 1.0), flip,
             uint8 images, tokenized captions);
  open_clip: `open_clip_train.data.get_wds_dataset`, its own training loader (webdataset
             0.2.86), with ViT-B-32's training transform (RandomResizedCrop with scale (0.9,
             1.0), float32 normalised tensors) and tokenizer.

The photos are scikit-learn's two sample photos (`china.jpg`, `flower.jpg`, 427 × 640), each
image a random crop of one, flipped, rotated and recoloured at random, saved with its short
side uniform in [300, 427] px (`--sides` 400), and the same image upscaled 2.4× (1000). Each
side gets its own `--shards` shards of `--images` images. The two loaders alternate, one run
each per source side per round, `--rounds` rounds; each run times 5 windows after a warm-up,
and gives the median window's images/s. Prints one line per run, then a table of each side's
medians and the ratio clipjax / open_clip of every round (taken in the same round), and last
one JSON line. `--baseline=DIR` runs a second clipjax checkout (an earlier commit, say) in
the same rotation.

open_clip needs torch, which clipjax's requirements leave out: install it in a virtualenv of
its own, with scikit-learn for the photos, and name its python:

  python3 -m venv /work/ocvenv
  /work/ocvenv/bin/pip install torch torchvision open_clip_torch webdataset==0.2.86 \
      braceexpand scikit-learn
  python benchmarks/input_vs_open_clip.py --open_clip_python=/work/ocvenv/bin/python

This script runs as three programs: the driver (clipjax's python), and, in open_clip's
python, `--write_shards` and `--open_clip_loader`, which the driver starts.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WINDOWS = 5  # as clipjax.bench --data_only times
UPSCALE = 2.4  # the ~1,000 px images: the ~400 px ones, this much larger


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--open_clip_python", help="python of a virtualenv with open_clip")
    parser.add_argument(
        "--baseline", help="another clipjax checkout to run too, as 'baseline' (e.g. a commit)"
    )
    parser.add_argument("--dir", default="/tmp/clipjax_input_vs_open_clip")
    parser.add_argument("--sides", default="400,1000", help="source sides to run: 400, 1000")
    parser.add_argument("--images", type=int, default=4000, help="images per source side")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="batches read before timing")
    parser.add_argument("--write_shards", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--open_clip_loader", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard_spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _folder(args, side: int) -> str:
    return os.path.join(args.dir, f"side{side}")


def _shard_spec(args, side: int) -> str:
    return os.path.join(_folder(args, side), f"shard-{{00000..{args.shards - 1:05d}}}.tar")


# ---------------------------------------------------------------- in open_clip's python
def write_shards(args) -> None:
    """The shards of both sides, from scikit-learn's sample photos (see the docstring)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    folders = {side: _folder(args, side) for side in (400, 1000)}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    per_shard = -(-args.images // args.shards)
    for shard in range(args.shards):
        paths = {side: os.path.join(f, f"shard-{shard:05d}.tar") for side, f in folders.items()}
        indices = range(shard * per_shard, min(args.images, (shard + 1) * per_shard))
        with contextlib.ExitStack() as stack:
            tars = {
                side: stack.enter_context(tarfile.open(p + ".tmp", "w"))
                for side, p in paths.items()
            }
            for i in indices:
                which = int(rng.integers(len(photos)))
                image, short = _distinct(photos[which], rng)
                caption = f"{('a temple in china', 'a flower')[which]}, photo {i}".encode()
                for side, tar in tars.items():
                    scale = short * (UPSCALE if side == 1000 else 1) / min(image.size)
                    size = (round(image.width * scale), round(image.height * scale))
                    out = io.BytesIO()
                    image.resize(size, Image.BICUBIC).save(out, "JPEG", quality=90)
                    for name, data in ((f"{i:06d}.jpg", out.getvalue()), (f"{i:06d}.txt", caption)):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        for path in paths.values():
            os.replace(path + ".tmp", path)


def _distinct(photo, rng):
    """A random crop of `photo`, flipped, rotated and recoloured at random, and the short side
    (px) its ~400 px version gets."""
    import numpy as np
    from PIL import Image, ImageEnhance

    area = photo.width * photo.height * rng.uniform(0.35, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
    w = min(photo.width, round((area * aspect) ** 0.5))
    h = min(photo.height, round((area / aspect) ** 0.5))
    left = int(rng.integers(0, photo.width - w + 1))
    top = int(rng.integers(0, photo.height - h + 1))
    image = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.rotate(float(rng.uniform(-12, 12)), Image.BILINEAR)
    if rng.random() < 0.3:
        image = image.transpose(Image.ROTATE_90)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return image, rng.uniform(300, 427)


def open_clip_loader(args) -> None:
    """Prints the JSON `{"images_per_s": median window rate, "window_images_per_s": ...,
    "image_bytes_per_example": ...}` of open_clip's training loader on `--shard_spec`."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    _, preprocess, _ = open_clip.create_model_and_transforms("ViT-B-32")
    loader_args = argparse.Namespace(
        train_data=args.shard_spec,
        train_num_samples=10**7,  # endless, as clipjax's stream
        dataset_resampled=True,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=args.batch,
        workers=args.workers,
        world_size=1,
    )
    data = get_wds_dataset(
        loader_args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32")
    )
    iterator = iter(data.dataloader)
    for _ in range(args.warmup):
        next(iterator)
    per_window, rates = max(1, args.batches // WINDOWS), []
    for _ in range(WINDOWS):
        start, count = time.perf_counter(), 0
        for _ in range(per_window):
            images, _ = next(iterator)
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    result = {
        "images_per_s": statistics.median(rates),
        "window_images_per_s": rates,
        "image_bytes_per_example": images[0].numel() * images.element_size(),
    }
    print(json.dumps(result), flush=True)
    os._exit(0)  # the loader's persistent workers need not be waited for


# ---------------------------------------------------------------- the driver
def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def run_clipjax(args, side: int, root: str = ROOT) -> dict:
    command = [
        sys.executable,
        "-m",
        "clipjax.bench",
        "--config=configs/clip_vitb32.py",
        "--data_only",
        f"--steps={args.batches}",
        f"--warmup_batches={args.warmup}",
        f"--config.data.train=webdataset:{_shard_spec(args, side)}",
        f"--config.batch_size={args.batch}",
        f"--config.data.num_workers={args.workers}",
    ]
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    return _last_json(done.stdout)


def run_open_clip(args, side: int) -> dict:
    command = [
        args.open_clip_python,
        os.path.abspath(__file__),
        "--open_clip_loader",
        f"--shard_spec={_shard_spec(args, side)}",
        f"--workers={args.workers}",
        f"--batch={args.batch}",
        f"--batches={args.batches}",
        f"--warmup={args.warmup}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return _last_json(done.stdout)


def main(args) -> None:
    if args.write_shards:
        return write_shards(args)
    if args.open_clip_loader:
        return open_clip_loader(args)
    if not args.open_clip_python:
        sys.exit("--open_clip_python: name the python of a virtualenv with open_clip_torch.")
    sides = [int(s) for s in args.sides.split(",")]
    last = os.path.join(_folder(args, 1000), f"shard-{args.shards - 1:05d}.tar")
    if not os.path.exists(last):
        print(f"writing {args.shards} shards of {args.images} images per side to {args.dir}")
        subprocess.run(
            [args.open_clip_python, os.path.abspath(__file__), "--write_shards",
             f"--dir={args.dir}", f"--images={args.images}", f"--shards={args.shards}"],
            check=True,
        )  # fmt: skip
    loaders = {"clipjax": run_clipjax, "open_clip": run_open_clip}
    if args.baseline:
        loaders["baseline"] = lambda args, side: run_clipjax(args, side, args.baseline)
    runs = {(side, lib): [] for side in sides for lib in loaders}
    bytes_per_example = {}
    for round_ in range(1, args.rounds + 1):
        for side in sides:
            for lib, run in loaders.items():
                result = run(args, side)
                runs[side, lib].append(result["images_per_s"])
                bytes_per_example[lib] = result.get("image_bytes_per_example", "not reported")
                windows = ", ".join(f"{r:.0f}" for r in result["window_images_per_s"])
                print(
                    f"round {round_}  ~{side} px  {lib:9s} {result['images_per_s']:7.1f} "
                    f"images/s  (windows {windows})",
                    flush=True,
                )
    print(
        f"\n{args.workers} workers, batch {args.batch}, 224 px, {args.images} images per side, "
        f"{args.rounds} alternating rounds; image bytes to the device per example: "
        + ", ".join(f"{lib} {n}" for lib, n in bytes_per_example.items())
        + "\n"
    )
    others = [lib for lib in loaders if lib != "clipjax"]
    print(
        "| source | "
        + " | ".join(f"{lib} images/s" for lib in loaders)
        + " | "
        + " | ".join(f"clipjax / {lib} per round (median)" for lib in others)
        + " |"
    )
    print("|---" * (1 + len(loaders) + len(others)) + "|")
    summary = {}
    for side in sides:
        cells, summary[f"side{side}"] = [f"~{side} px"], {}
        for lib in loaders:
            cells.append(f"{statistics.median(runs[side, lib]):.0f}")
            summary[f"side{side}"][lib] = runs[side, lib]
        for lib in others:
            ratios = [a / b for a, b in zip(runs[side, "clipjax"], runs[side, lib], strict=True)]
            listed = ", ".join(f"{r:.2f}" for r in ratios)
            cells.append(f"{listed} ({statistics.median(ratios):.2f})")
            summary[f"side{side}"][f"clipjax_over_{lib}"] = ratios
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({**summary, "image_bytes_per_example": bytes_per_example}))


if __name__ == "__main__":
    main(_args())
