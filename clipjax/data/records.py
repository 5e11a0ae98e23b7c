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


def load_image(data: bytes, key: str) -> Image.Image:
    """Encoded image bytes -> a fully decoded PIL image (any mode); BadRecord if they do not
    decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise BadRecord(key, "cannot identify image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports truncated or corrupt data as OSError, some codecs as ValueError or
        # SyntaxError.
        raise BadRecord(key, str(e) or type(e).__name__) from None
    if image.width == 0 or image.height == 0:
        raise BadRecord(key, "empty image")
    return image


def _image(value, key: str) -> np.ndarray:
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
        return np.asarray(load_image(bytes(value), key).convert("RGB"))
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


def decode(record: dict) -> dict:
    """A raw record -> `{"key", "image": uint8 (H, W, 3) RGB, "caption": str | "captions":
    list[str], "label": int}` (caption(s) and label only when the record has them; captions
    stripped of surrounding whitespace).

    Raises `BadRecord` for undecodable image bytes, a missing file, a missing, empty or
    non-text caption (also when any one of `captions` is).
    """
    key = str(record.get("key", "?"))
    example = {"key": key, "image": _image(record.get("image"), key)}
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
