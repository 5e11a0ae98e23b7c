r"""Zero-shot classification of image files with any model `clipjax.load` reads.

  python -m clipjax.predict --model=/tmp/clip_local --images='photos/*.png' \
      --labels="red circle,blue square,green triangle"

Prints, per image, the labels' probabilities (softmax of logit_scale · cosine similarity of
the image to each label's prompt embedding; for a FILIP workdir, of its token-wise scores, as
its zero-shot evaluation), highest first. `--template` makes the prompt
("a photo of a {}." by default; "{}" uses the label as it is).
"""

import glob
import sys

import numpy as np
from absl import app, flags
from PIL import Image, UnidentifiedImageError

from clipjax import inference
from clipjax.errors import ConfigError
from clipjax.metrics import quiet_library_logs

FLAGS = flags.FLAGS


def probabilities(model, images: np.ndarray, labels: list[str], template: str) -> np.ndarray:
    """Preprocessed uint8 images (n, size, size, 3) -> (n, len(labels)) zero-shot probabilities."""
    prompts = model.tokenize([template.format(label) for label in labels])
    logits = model.zeroshot_logits(images, prompts)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def predict(model_path: str, pattern: str, labels: list[str], template: str, top: int) -> str:
    """The printed report; ConfigError, in one line, for bad input."""
    labels = [label.strip() for label in labels if label.strip()]
    if len(labels) < 2:
        raise ConfigError("--labels must name at least two comma-separated classes.")
    if "{}" not in template:
        raise ConfigError(f"--template={template!r} has no {{}} for the label.")
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError(f"--images={pattern!r} matches no file.")
    model = inference.load(model_path)
    images, kept, lines = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(model.preprocess(image))
            kept.append(path)
        except (OSError, UnidentifiedImageError) as e:
            lines.append(f"{path}: skipped, not a readable image ({e})")
    if kept:
        probs = probabilities(model, np.stack(images), labels, template)
        for path, row in zip(kept, probs, strict=True):
            order = np.argsort(-row)[:top]
            lines.append(f"{path}: " + ", ".join(f"{labels[i]} {row[i]:.3f}" for i in order))
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("model", None, "A clipjax workdir, export or open_clip folder.")
    flags.DEFINE_string("images", None, "A glob of image files.")
    flags.DEFINE_list("labels", None, "Class names, comma-separated.")
    flags.DEFINE_string("template", "a photo of a {}.", "The prompt; {} is the label.")
    flags.DEFINE_integer("top", 5, "Labels printed per image.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not (FLAGS.model and FLAGS.images and FLAGS.labels):
        print("clipjax.predict: --model, --images and --labels must be given.", file=sys.stderr)
        sys.exit(2)
    quiet_library_logs()
    try:
        print(predict(FLAGS.model, FLAGS.images, FLAGS.labels, FLAGS.template, FLAGS.top))
    except ConfigError as e:
        print(f"clipjax.predict: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
