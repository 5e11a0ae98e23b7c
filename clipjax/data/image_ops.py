"""Per-example image operations on numpy arrays (uint8 HWC RGB), using PIL for pixel work.

Two training recipes, chosen by an `Augment` (`config.data.augment`): "clip" (RandomResizedCrop
and an optional flip, CLIP's) and "mocov2" (MoCo v2's two-crop recipe, DeCLIP's: the same crop
and flip plus colour jitter, grayscale and blur). The photometric operations follow torchvision
on PIL images, which is what MoCo v2 ran.
"""

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from clipjax.data.records import EncodedImage


def _resize_box(image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Resizes the region `box` = (left, top, right, bottom) of `image` (a uint8 array, or an
    `EncodedImage`, decoded no larger than the region needs) to uint8 (size, size, 3)."""
    if isinstance(image, EncodedImage):
        return image.region(box, size)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """torchvision's RandomResizedCrop: uint8 (H, W, 3) or an `EncodedImage` -> uint8 (size,
    size, 3).

    Picks a crop whose area is a `scale` fraction of the image and whose aspect ratio is
    log-uniform in `ratio`; after 10 failed tries, falls back to a centre crop clamped to `ratio`.
    """
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize_box(image, (left, top, left + w, top + h), size)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return _resize_box(image, (left, top, left + w, top + h), size)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors (H, W, C) left-right with probability 1/2: a view, which the batch's stacking
    copies once."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def _pil_op(image: np.ndarray, op) -> np.ndarray:
    """Applies `op` (PIL RGB image -> PIL RGB image) to a uint8 (H, W, 3) array."""
    return np.asarray(op(Image.fromarray(image)))


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Pixels scaled by `factor` (0: black, 1: unchanged), clipped to [0, 255]."""
    return _pil_op(image, lambda im: ImageEnhance.Brightness(im).enhance(factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Pixels moved away from (factor > 1) or towards (< 1) the image's mean grey level."""
    return _pil_op(image, lambda im: ImageEnhance.Contrast(im).enhance(factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Pixels moved away from (factor > 1) or towards (< 1) their own grey level."""
    return _pil_op(image, lambda im: ImageEnhance.Color(im).enhance(factor))


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Hue rotated by `shift` turns (in [-0.5, 0.5]); saturation and value kept.

    In PIL's HSV, where hue is a uint8 and 255 steps make a full turn (rgb2hsv stores at most
    254, hsv2rgb maps 255 back to red), so the shift is rounded to 1/255 of a turn.
    """
    steps = round(shift * 255)
    if steps % 255 == 0:  # a whole number of turns: skip the lossy HSV round trip
        return image
    hue, saturation, value = Image.fromarray(image).convert("HSV").split()
    hue = ((np.asarray(hue, np.int32) + steps) % 255).astype(np.uint8)
    hsv = Image.merge("HSV", (Image.fromarray(hue), saturation, value))
    return np.asarray(hsv.convert("RGB"))


def grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (0.299 R + 0.587 G + 0.114 B, rounded), replicated to 3 channels."""
    return _pil_op(image, lambda im: im.convert("L").convert("RGB"))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels (PIL's box-blur approximation)."""
    return _pil_op(image, lambda im: im.filter(ImageFilter.GaussianBlur(sigma)))


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> np.ndarray:
    """torchvision's ColorJitter: brightness, contrast and saturation factors uniform in
    [1 - x, 1 + x] (floored at 0), a hue shift uniform in [-hue, hue] turns, the four applied in
    a random order. uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    order = rng.permutation(4)  # drawn first, as torchvision does
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)]
    ops = [
        (adjust_brightness, factors[0]),
        (adjust_contrast, factors[1]),
        (adjust_saturation, factors[2]),
        (adjust_hue, rng.uniform(-hue, hue)),
    ]
    for i in order:
        op, amount = ops[i]
        image = op(image, amount)
    return image


RECIPES = ("clip", "mocov2")
# MoCo v2 blurs with sigma in [0.1, 2.0] pixels at 224 px; clipjax scales that to the image size.
_MOCO_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Augment:
    """A training view's augmentation: uint8 (H, W, 3) or an `EncodedImage` -> uint8 (size,
    size, 3).

    - "clip": RandomResizedCrop(`crop_scale`), then a horizontal flip with p=0.5 if `flip`.
    - "mocov2": the same crop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with
      p=0.2, Gaussian blur with p=0.5 and sigma uniform in [0.1, 2.0] · size/224 pixels (MoCo
      v2's range at 224 px, scaled to the output size), then the flip if `flip`.
    """

    recipe: str = "clip"
    crop_scale: tuple[float, float] = (0.9, 1.0)
    flip: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(
                f"config.data.augment.recipe={self.recipe!r} is unknown; use one of "
                f"{', '.join(RECIPES)}."
            )
        low, high = (float(s) for s in self.crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"config.data.augment.crop_scale={tuple(self.crop_scale)} must be (low, high) "
                "area fractions with 0 < low <= high <= 1, e.g. (0.9, 1.0)."
            )
        object.__setattr__(self, "crop_scale", (low, high))

    def __call__(self, image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        image = random_resized_crop(image, rng, size, scale=self.crop_scale)
        if self.recipe == "mocov2":
            if rng.random() < 0.8:
                image = color_jitter(image, rng)
            if rng.random() < 0.2:
                image = grayscale(image)
            if rng.random() < 0.5:
                image = gaussian_blur(image, rng.uniform(0.1, 2.0) * size / _MOCO_SIZE)
        return random_flip(image, rng) if self.flip else image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation resize: the largest centred square of uint8 (H, W, 3) or an `EncodedImage`,
    resized to uint8 (size, size, 3)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize_box(image, (left, top, left + side, top + side), size)
