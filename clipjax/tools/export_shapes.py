r"""Write the built-in `shapes` dataset out as ordinary files, to rehearse the real-data path.

  python -m clipjax.tools.export_shapes --output=/tmp/shapes_files

writes what a user typically brings:
  images/000000.png ...       training images
  train.csv                   columns `image` (path relative to the CSV) and `caption`
  eval/<class>/000000.png ... the held-out split as one folder per class (`folder:` source)
  eval_captions.csv           the held-out images with their captions (retrieval)
  probe/<class>/000000.png .. more labelled images, another random stream (linear probe)

so the README's "your own data" walk-through runs offline, end to end.
"""

import csv
import os
import sys

from absl import app, flags
from PIL import Image

from clipjax.data import shapes


def _save(image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def _write_csv(path: str, rows: list[tuple[str, str]]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def _write_classes(source, output: str, folder: str) -> list[tuple[str, str]]:
    """Each example to `output/folder/<class>/<index>.png`; returns (path, caption) rows."""
    rows = []
    for i in range(len(source)):
        example = source[i]
        label = shapes.CLASS_NAMES[example["label"]].replace(" ", "_")
        name = f"{folder}/{label}/{i:06d}.png"
        _save(example["image"], os.path.join(output, name))
        rows.append((name, example["caption"]))
    return rows


def export(output: str, num_train: int, num_eval: int, num_probe: int, image_size: int) -> None:
    os.makedirs(output, exist_ok=True)  # the CSVs need it when a split writes no image
    train = shapes.ShapesSource("train", size=num_train, render_size=image_size)
    rows = []
    for i in range(num_train):
        example = train[i]
        name = f"images/{i:06d}.png"
        _save(example["image"], os.path.join(output, name))
        rows.append((name, example["caption"]))
        if (i + 1) % 1000 == 0 or i + 1 == num_train:
            print(f"\rtrain {i + 1}/{num_train}", end="", file=sys.stderr, flush=True)
    _write_csv(os.path.join(output, "train.csv"), rows)
    held_out = shapes.ShapesSource("eval", size=num_eval, render_size=image_size)
    _write_csv(os.path.join(output, "eval_captions.csv"), _write_classes(held_out, output, "eval"))
    probe = shapes.ShapesSource("eval", size=num_probe, render_size=image_size, seed=1)
    _write_classes(probe, output, "probe")
    print(
        f"\rwrote {num_train} training, {num_eval} held-out and {num_probe} probe images to "
        f"{output}",
        file=sys.stderr,
    )


def _define_flags() -> None:
    # Defined here, not on import, so that importing this module adds no global flags.
    flags.DEFINE_string("output", None, "Directory to write (existing files are replaced).")
    flags.DEFINE_integer("train", 20_000, "Training examples.")
    flags.DEFINE_integer("eval", 2_048, "Held-out examples.")
    flags.DEFINE_integer("probe", 2_048, "Labelled examples for fitting linear probes.")
    flags.DEFINE_integer("image_size", 64, "Side of the written images, in pixels.")
    flags.mark_flags_as_required(["output"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    export(FLAGS.output, FLAGS.train, FLAGS.eval, FLAGS.probe, FLAGS.image_size)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
