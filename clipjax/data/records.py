"""Raw records -> decoded examples, and the msgpack record format of clipjax's ArrayRecord files.

A raw record (what `sources` hand out, cheap to read) is a dict with `key` (str, for logs),
`image` (encoded bytes, a file path, or a decoded uint8 array) and `caption` (str or bytes) or
`captions` (a list of them), plus `label` (int) for labelled sources. `decode` turns one into
an example or raises `BadRecord`, which the pipelines count and skip.
"""

import io
from collections.abc import Iterable, Iterator

import msgpack
import numpy as np
from PIL import Image, UnidentifiedImageError

from clipjax import paths


class BadRecord(Exception):
    """A record that cannot be used: `key` names it, `reason` says why (one short phrase)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key} ({reason})")
        self.key, self.reason = key, reason


def open_image(data: bytes, key: str) -> Image.Image:
    """Encoded image bytes -> a PIL image whose header is read and pixels are not; BadRecord if
    they are not an image."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadRecord(key, "cannot identify image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRecord(key, str(e) or type(e).__name__) from None
    if image.width == 0 or image.height == 0:
        raise BadRecord(key, "empty image")
    return image


def _load(image: Image.Image, key: str) -> Image.Image:
    """`image` (from `open_image`) with its pixels decoded; BadRecord if they do not decode."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:
        # PIL reports truncated or corrupt data as OSError, some codecs as ValueError or
        # SyntaxError.
        raise BadRecord(key, str(e) or type(e).__name__) from None
    return image


def load_image(data: bytes, key: str) -> Image.Image:
    """Encoded image bytes -> a fully decoded PIL image (any mode); BadRecord if they do not
    decode."""
    return _load(open_image(data, key), key)


def _rgb(image: Image.Image) -> Image.Image:
    # `convert` copies even an RGB image: a full-size copy per record, 7% of a 400 px JPEG's
    # decode, crop and resize (cProfile).
    return image if image.mode == "RGB" else image.convert("RGB")


class EncodedImage:
    """An image kept encoded until a region of it is asked for, then decoded no larger than
    that region needs.

    A JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the full cost (libjpeg's
    DCT scaling, `PIL.Image.draft`): a 1,000 px photo bound for a 224 px crop need never exist
    at full size. `region` takes the largest reduction that leaves the region `REDUCING_GAP`
    times the output size each way, so the resize after it still shrinks and filters as it
    would from the full decode. Other formats decode at full size. `shape` (H, W, 3) comes
    from the header; each decode is kept for the next region (a second augmented view).
    """

    # PIL's `thumbnail` keeps the same gap, for the same trade of speed against fidelity.
    REDUCING_GAP = 2.0

    def __init__(self, data: bytes, key: str):
        self._data, self._key = data, key
        self._unread = open_image(data, key)  # the header read; its first decode reuses it
        self.shape = (self._unread.height, self._unread.width, 3)
        self._jpeg = self._unread.format == "JPEG"
        self._decoded = {}  # reduction -> the RGB PIL image decoded at it

    def reduction(self, box: tuple[float, float, float, float], size: int) -> int:
        """The largest of 8, 4, 2 at which `box` (left, top, right, bottom) still spans
        `REDUCING_GAP` · `size` pixels each way, else 1 (always 1 for formats but JPEG)."""
        side = min(box[2] - box[0], box[3] - box[1])
        for scale in (8, 4, 2):
            if self._jpeg and side >= scale * self.REDUCING_GAP * size:
                return scale
        return 1

    def _pixels(self, scale: int) -> tuple[Image.Image, int]:
        """The image decoded at reduction `scale` or finer (a decode already made is reused),
        RGB, and the reduction it has."""
        finer = [s for s in self._decoded if s <= scale]
        if finer:
            return self._decoded[max(finer)], max(finer)
        image = self._unread if self._unread is not None else open_image(self._data, self._key)
        self._unread = None
        if scale > 1:
            # `draft` returns the full image's box in reduced pixels (None: it cannot reduce).
            drafted = image.draft("RGB", (image.width // scale, image.height // scale))
            scale = round(self.shape[1] / drafted[1][2]) if drafted else 1
        image = _rgb(_load(image, self._key))
        self._decoded[scale] = image
        return image, scale

    def region(self, box: tuple[float, float, float, float], size: int) -> np.ndarray:
        """The region `box` = (left, top, right, bottom), in full-size pixels, resized to uint8
        (size, size, 3) by PIL's bilinear filter from the smallest decode `reduction` allows."""
        image, scale = self._pixels(self.reduction(box, size))
        box = tuple(c / scale for c in box)
        return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


def _image(value, key: str, encoded: bool) -> "np.ndarray | EncodedImage":
    if isinstance(value, np.ndarray):
        if value.size == 0:
            raise BadRecord(key, "empty image")
        if value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3:
            return value
        if value.dtype != np.uint8 or value.ndim not in (2, 3):
            raise BadRecord(key, f"image array of shape {value.shape} and dtype {value.dtype}")
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        try:  # grey (H, W), grey+alpha (H, W, 2) or RGBA (H, W, 4)
            return np.asarray(Image.fromarray(value).convert("RGB"))
        except (TypeError, ValueError):
            raise BadRecord(key, f"image array of shape {value.shape}") from None
    if isinstance(value, str):
        try:
            value = paths.read_bytes(value)
        except OSError as e:
            raise BadRecord(key, e.strerror or str(e)) from None
    if isinstance(value, bytes | bytearray | memoryview):
        if encoded:
            return EncodedImage(bytes(value), key)
        return np.asarray(_rgb(load_image(bytes(value), key)))
    raise BadRecord(key, "missing image" if value is None else f"image of type {type(value)}")


def clean_caption(value, key: str) -> str:
    """`value` (str, or UTF-8 bytes) stripped; BadRecord(key, ...) if it is not non-empty text."""
    if isinstance(value, bytes | np.bytes_):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord(key, "caption is not UTF-8 text") from None
    if value is None:
        raise BadRecord(key, "missing caption")
    if not isinstance(value, str):
        raise BadRecord(key, f"caption of type {type(value).__name__}")
    value = value.strip()
    if not value:
        raise BadRecord(key, "empty caption")
    return value


def first_usable(captions: Iterable, num: int) -> Iterator[str]:
    """The first `num` captions that `decode` would accept, stripped (to train a tokenizer)."""
    count = 0
    for caption in captions:
        if count >= num:
            return
        try:
            yield clean_caption(caption, "")
        except BadRecord:
            continue
        count += 1


def decode(record: dict, encoded: bool = False) -> dict:
    """A raw record -> `{"key", "image": uint8 (H, W, 3) RGB, "caption": str | "captions":
    list[str], "label": int}` (caption(s) and label only when the record has them; captions
    stripped of surrounding whitespace). With `encoded`, an image that comes as bytes or a
    file stays an `EncodedImage`, its pixels decoded by the crop that uses them.

    Raises `BadRecord` for undecodable image bytes, a missing file, a missing, empty or
    non-text caption (also when any one of `captions` is); with `encoded`, pixels that do not
    decode raise it from `EncodedImage.region`.
    """
    key = str(record.get("key", "?"))
    example = {"key": key, "image": _image(record.get("image"), key, encoded)}
    if "caption" in record:
        example["caption"] = clean_caption(record["caption"], key)
    if "captions" in record:
        captions = record["captions"]
        if isinstance(captions, str | bytes) or not len(captions):
            raise BadRecord(key, "captions is not a non-empty list")
        example["captions"] = [clean_caption(c, key) for c in captions]
    if "label" in record:
        example["label"] = int(record["label"])
    return example


def pack(record: dict) -> bytes:
    """`{"key": str, "image": bytes, "caption": str}` -> one msgpack record of clipjax's
    ArrayRecord files (the image stays encoded, as jpg/png/webp)."""
    return msgpack.packb(
        {"key": str(record["key"]), "image": bytes(record["image"]), "caption": record["caption"]},
        use_bin_type=True,
    )


def unpack(data: bytes) -> dict:
    """The inverse of `pack`: `{"key": str, "image": bytes, "caption": str}`.

    Raises ValueError for bytes that are not such a record (a file not written by
    clipjax.tools.convert)."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except ValueError as e:  # msgpack's format errors are ValueErrors
        raise ValueError(
            f"an ArrayRecord record is not a clipjax msgpack record ({e}); write the files with "
            "`python -m clipjax.tools.convert`."
        ) from None
    if not isinstance(record, dict) or "image" not in record:
        raise ValueError(
            "an ArrayRecord record is not a clipjax record (a msgpack map with 'key', 'image' "
            "and 'caption'); write the files with `python -m clipjax.tools.convert`."
        )
    return record
