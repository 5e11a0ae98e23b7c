"""The built-in `glyphs` dataset: letters and digits rendered in varied fonts, with captions.

A second built-in dataset that is not procedural shapes: each image is one character (26
capital letters and 10 digits) drawn with PIL in one of matplotlib's bundled TrueType fonts
(DejaVu and STIX: sans, serif, mono; regular, bold, italic), at a random size, position,
slight rotation and colour, on a light background. Like `shapes`, every example is drawn from
`np.random.default_rng([seed, split_id, index])`: no files, random access, deterministic.

- `train` split: one glyph per image; the caption names the character and, in varied
  phrasings, some of its colour, size and typeface.
- `eval` split: held out (another random stream), labels balanced over `CLASS_NAMES`.

Orientation carries meaning here (a mirrored "R" is no letter), so it is the dataset on which
horizontal flips are a wrong augmentation.
"""

import dataclasses
import functools
import os
import string

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipjax.data import synthetic

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHARACTERS = string.ascii_uppercase + string.digits
CLASS_NAMES: list[str] = [
    f"letter {c}" if c.isalpha() else f"digit {DIGIT_WORDS[int(c)]}" for c in CHARACTERS
]
PROMPT_TEMPLATES: list[str] = [
    "the {}.",
    "a picture of the {}.",
    "an image of the {}.",
    "the {} on a plain background.",
    "a rendering of the {}.",
]
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "green": (30, 140, 50),
    "blue": (30, 60, 200),
    "purple": (120, 40, 160),
    "orange": (235, 120, 20),
    "black": (20, 20, 20),
}
# (file in matplotlib's fonts/ttf, the words a caption may use for it)
FONTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("DejaVuSans.ttf", ("sans-serif",)),
    ("DejaVuSans-Bold.ttf", ("bold", "bold sans-serif")),
    ("DejaVuSans-Oblique.ttf", ("slanted", "oblique")),
    ("DejaVuSerif.ttf", ("serif",)),
    ("DejaVuSerif-Bold.ttf", ("bold serif",)),
    ("DejaVuSerif-Italic.ttf", ("italic", "italic serif")),
    ("DejaVuSansMono.ttf", ("monospace", "typewriter")),
    ("STIXGeneral.ttf", ("classic serif", "book")),
)
# Each takes a noun phrase with its article.
_CAPTIONS = (
    "{}",
    "a picture of {}",
    "an image of {}",
    "{} on a light background",
    "this shows {}",
    "a rendering of {}",
    "a sign with {}",
)


@functools.cache
def _font(file: str, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(
        os.path.join(matplotlib.get_data_path(), "fonts", "ttf", file), pixels
    )


@dataclasses.dataclass(frozen=True)
class _Glyph:
    char_index: int
    color: str
    font: int  # index in FONTS
    scale: float  # glyph height as a fraction of the image side
    center: tuple[float, float]  # fractions of the side
    angle: float  # degrees
    background: tuple[int, int, int]


def _sample(rng: np.random.Generator, split: str, index: int) -> _Glyph:
    char = index % len(CHARACTERS) if split == "eval" else int(rng.integers(len(CHARACTERS)))
    color = list(COLORS)[rng.integers(len(COLORS))]
    font = int(rng.integers(len(FONTS)))
    scale = float(rng.uniform(0.45, 0.8))
    margin = scale / 2
    center = tuple(float(rng.uniform(max(margin, 0.35), min(1 - margin, 0.65))) for _ in "xy")
    angle = float(rng.uniform(-12, 12))
    background = tuple(int(v) for v in rng.integers(220, 256, size=3))
    return _Glyph(char, color, font, scale, center, angle, background)


def _name(glyph: _Glyph, rng: np.random.Generator) -> str:
    """The character's name, e.g. "letter R", "digit seven" or "number 7"."""
    char = CHARACTERS[glyph.char_index]
    if char.isalpha():
        return f"letter {char}" if rng.random() < 0.8 else f"capital {char}"
    word = DIGIT_WORDS[int(char)]
    return (f"digit {word}", f"number {word}", f"number {char}")[rng.integers(3)]


def _caption(glyph: _Glyph, rng: np.random.Generator) -> str:
    words = [_name(glyph, rng)]
    if rng.random() < 0.6:
        words.insert(0, glyph.color)
    if rng.random() < 0.3:
        words.insert(0, ("big", "large")[rng.integers(2)] if glyph.scale > 0.62 else "small")
    if rng.random() < 0.5:
        style = FONTS[glyph.font][1]
        words.append(f"in {style[rng.integers(len(style))]} type")
    phrase = " ".join(words)
    phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    text = _CAPTIONS[rng.integers(len(_CAPTIONS))].format(phrase)
    return text + "." if rng.random() < 0.3 else text


def _render(glyph: _Glyph, side: int) -> np.ndarray:
    # Drawn on a 2× canvas and reduced, for anti-aliased edges at small sides.
    big = 2 * side
    font = _font(FONTS[glyph.font][0], max(8, round(glyph.scale * big)))
    layer = Image.new("L", (big, big), 0)
    ImageDraw.Draw(layer).text(
        (glyph.center[0] * big, glyph.center[1] * big),
        CHARACTERS[glyph.char_index],
        fill=255,
        font=font,
        anchor="mm",
    )
    layer = layer.rotate(glyph.angle, resample=Image.BILINEAR, center=(big / 2, big / 2))
    image = Image.new("RGB", (big, big), glyph.background)
    image.paste(Image.new("RGB", (big, big), COLORS[glyph.color]), mask=layer)
    return np.asarray(image.resize((side, side), Image.BILINEAR))


class GlyphsSource(synthetic.SyntheticSource):
    """Random-access source of glyph examples, with the interface of `shapes.ShapesSource`:
    `source[i]` is `{"image": uint8 (render_size, render_size, 3), "caption": str, "label":
    int32}`, `label` being the index in `CLASS_NAMES`."""

    name = "glyphs"
    class_names = CLASS_NAMES
    prompt_templates = PROMPT_TEMPLATES
    sample = staticmethod(_sample)
    caption = staticmethod(_caption)
    render = staticmethod(_render)

    @staticmethod
    def label(glyph: _Glyph) -> int:
        return glyph.char_index
