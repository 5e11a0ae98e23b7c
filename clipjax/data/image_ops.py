"""Per-example image operations on numpy arrays (uint8 HWC RGB), using PIL for resampling."""

import math

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _resize_box(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Resizes the region `box` = (left, top, right, bottom) of `image` to (size, size, 3)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """torchvision's RandomResizedCrop: uint8 (H, W, 3) -> uint8 (size, size, 3).

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
    """Mirrors (H, W, C) left-right with probability 1/2."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < 0.5 else image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation resize: the largest centred square, resized to uint8 (size, size, 3)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize_box(image, (left, top, left + side, top + side), size)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 (..., 3): pixels in [0, 1], standardised with CLIP's mean/std."""
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
