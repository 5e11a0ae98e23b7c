"""The built-in `shapes` dataset: procedural images of coloured shapes with varied captions.

Every example is drawn on the fly from `np.random.default_rng([seed, split_id, index])`, so the
dataset needs no files, is random-access and deterministic, and can be as large as wanted.

- `train` split: 1–2 objects per image, each with a colour, a shape, a size and a position, and a
  caption in one of many phrasings.
- `eval` split: held out (another random stream), one object per image, labels balanced over
  `CLASS_NAMES` (every colour × shape), captions as in training for retrieval.

Positions in captions are only vertical ("near the top"): training flips images horizontally.
"""

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from clipjax.data import synthetic

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (245, 130, 15),
    "yellow": (235, 200, 0),
    "green": (30, 150, 45),
    "cyan": (0, 185, 200),
    "blue": (25, 55, 215),
    "purple": (125, 35, 165),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
_PLURALS = {"cross": "crosses"}
CLASS_NAMES: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
PROMPT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "a {} on a plain background.",
    "an image showing a {}.",
    "a simple illustration of a {}.",
]

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_POSITION_WORDS = {
    "top": ("near the top", "at the top", "in the upper part"),
    "middle": ("in the middle", "in the centre", "in the center"),
    "bottom": ("near the bottom", "at the bottom", "in the lower part"),
}
_ONE = (
    "{}",
    "a picture of {}",
    "a photo of {}",
    "an image of {}",
    "a drawing showing {}",
    "there is {}",
    "{} on a plain background",
    "{} on a light background",
    "a simple illustration of {}",
    "this image shows {}",
    "here we see {}",
    "a sketch of {}",
)
_TWO = (
    "{} and {}",
    "{} next to {}",
    "{} along with {}",
    "{} together with {}",
    "two shapes: {} and {}",
    "a picture of {} and {}",
    "there is {} and {}",
    "an image with {} next to {}",
    "a drawing showing {} along with {}",
)


@dataclasses.dataclass(frozen=True)
class _Object:
    color: str
    shape: str
    size: str  # "small" | "large"
    position: str  # vertical: "top" | "middle" | "bottom"
    center: tuple[float, float]  # (x, y) as fractions of the image side
    radius: float  # fraction of the image side
    angle: float  # rotation in radians


@dataclasses.dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    background: tuple[int, int, int]


def _sample_object(rng: np.random.Generator, class_index: int, x_range) -> _Object:
    color, shape = CLASS_NAMES[class_index].split()
    size = ("small", "large")[rng.integers(2)]
    radius = rng.uniform(0.10, 0.14) if size == "small" else rng.uniform(0.19, 0.25)
    position = ("top", "middle", "bottom")[rng.integers(3)]
    y = {"top": 1 / 6, "middle": 1 / 2, "bottom": 5 / 6}[position] + rng.uniform(-0.05, 0.05)
    y = float(np.clip(y, radius, 1 - radius))
    x = float(np.clip(rng.uniform(*x_range), radius, 1 - radius))
    angle = rng.uniform(-0.35, 0.35)
    return _Object(color, shape, size, position, (x, y), radius, angle)


def _sample_scene(rng: np.random.Generator, split: str, index: int) -> _Scene:
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    if split == "eval":
        classes, x_ranges = [index % len(CLASS_NAMES)], [(0.25, 0.75)]
    elif rng.random() < 0.5:
        classes, x_ranges = [rng.integers(len(CLASS_NAMES))], [(0.25, 0.75)]
    else:
        # Two distinct objects, one in each half so that they rarely overlap.
        classes = rng.choice(len(CLASS_NAMES), size=2, replace=False)
        x_ranges = [(0.15, 0.35), (0.65, 0.85)]
        rng.shuffle(x_ranges)
    objects = tuple(
        _sample_object(rng, int(c), xs) for c, xs in zip(classes, x_ranges, strict=True)
    )
    return _Scene(objects, background)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options) -> str:
    return options[rng.integers(len(options))]


def _describe(obj: _Object, rng: np.random.Generator, *, with_color: bool = True) -> str:
    """A noun phrase without article, e.g. "small red star near the top"."""
    words = [obj.shape]
    if with_color:
        words = [obj.color, obj.shape] if rng.random() < 0.85 else [obj.shape, "in", obj.color]
    if rng.random() < 0.4:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj.size]))
    if rng.random() < 0.4:
        words.append(_pick(rng, _POSITION_WORDS[obj.position]))
    return " ".join(words)


def _caption(scene: _Scene, rng: np.random.Generator) -> str:
    objects = scene.objects
    if len(objects) == 1:
        text = _pick(rng, _ONE).format(_with_article(_describe(objects[0], rng)))
    elif objects[0].shape == objects[1].shape and rng.random() < 0.5:
        colors = [_with_article(f"{o.color} one") for o in objects]
        plural = _PLURALS.get(objects[0].shape, objects[0].shape + "s")
        text = f"two {plural}: {colors[0]} and {colors[1]}"
    elif objects[0].color == objects[1].color and rng.random() < 0.5:
        nouns = [_with_article(_describe(o, rng, with_color=False)) for o in objects]
        text = f"two {objects[0].color} shapes, {nouns[0]} and {nouns[1]}"
    else:
        phrases = [_with_article(_describe(o, rng)) for o in objects]
        text = _pick(rng, _TWO).format(*phrases)
    return text + "." if rng.random() < 0.3 else text


def _unit_points(shape: str) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius 1 around the origin (y points down)."""
    if shape == "cross":
        # A plus sign whose arms are a third of its width.
        a, b = 0.9, 0.3
        half = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        return half + [(-x, -y) for x, y in half]
    radii = {
        "square": [1.0] * 4,
        "triangle": [1.0] * 3,
        "hexagon": [1.0] * 6,
        "star": [1.0, 0.45] * 5,
    }
    # Squares sit on an edge; triangles and stars point up.
    offset = math.pi / 4 if shape == "square" else -math.pi / 2
    n = len(radii[shape])
    return [
        (r * math.cos(offset + 2 * math.pi * k / n), r * math.sin(offset + 2 * math.pi * k / n))
        for k, r in enumerate(radii[shape])
    ]


def _polygon(obj: _Object, side: int) -> list[tuple[float, float]]:
    """Vertices in pixels of `obj`, rotated by its angle."""
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
    return [
        (cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
        for x, y in _unit_points(obj.shape)
    ]


def _render(scene: _Scene, side: int) -> np.ndarray:
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        color = COLORS[obj.color]
        if obj.shape == "circle":
            cx, cy, r = obj.center[0] * side, obj.center[1] * side, obj.radius * side
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(obj, side), fill=color)
    return np.asarray(image)


class ShapesSource(synthetic.SyntheticSource):
    """Grain random-access source of shapes examples.

    `source[i]` is `{"image": uint8 (render_size, render_size, 3), "caption": str,
    "label": int32}`; `label` is the index in `CLASS_NAMES` of the (first) object.
    """

    name = "shapes"
    class_names = CLASS_NAMES
    prompt_templates = PROMPT_TEMPLATES
    sample = staticmethod(_sample_scene)
    caption = staticmethod(_caption)
    render = staticmethod(_render)

    @staticmethod
    def label(scene: _Scene) -> int:
        first = scene.objects[0]
        return CLASS_NAMES.index(f"{first.color} {first.shape}")

    def contents(self, index: int) -> frozenset[tuple[str, str]]:
        """The (colour, shape) of every object of example `index`, without drawing it."""
        return frozenset((o.color, o.shape) for o in self.spec_and_caption(index)[0].objects)
