"""Data sources named by spec strings: `scheme[:ARG][?key=value&key=value]`.

  shapes, shapes:N [?seed=S]        the built-in procedural dataset (train and eval)
  glyphs, glyphs:N [?seed=S]        built-in rendered letters and digits (train and eval)
  csv:PATH [?image=&caption=&label=] a .csv (comma) or .tsv (tab) of image paths and captions
  folder:PATH                       one subfolder of images per class (eval only)
  arrayrecord:GLOB_OR_DIR           shards written by `python -m clipjax.tools.convert`
  webdataset:GLOB [?buffer=N]       tar shards streamed as they are (train only; `webdataset`)
  tfds:NAME[:SPLIT] [?data_dir=&image=&caption=&label=]   a prepared TFDS dataset (ArrayRecord)
  mix:SPEC@W,SPEC@W,...             training sources sampled in proportion to their weights

A source is random-access (`len(src)`, `src[i]`) over RAW records, which are cheap to read
(no image decoding; `records.decode` does that, in the pipeline's workers): dicts with `key`
(str, for logs), `image` (encoded bytes, a file path, or a decoded uint8 array), `caption`
(str) or `captions` (list[str]), and `label` (int) in labelled "eval" sources. Attributes:
`class_names` and `prompt_templates` (lists, or None), and `captions(num)`, the first `num`
usable training captions (to train a tokenizer). Sources pickle cheaply (Grain spawns workers):
files are read lazily in each process. `webdataset:` is the exception: a stream of shards, read
by `webdataset.ShardStream`. Every path may be local or remote (`gs://bucket/...`; `paths`).
"""

import csv
import hashlib
import os
from collections.abc import Iterator

import grain
import numpy as np

from clipjax import paths
from clipjax.data import glyphs, records, shapes, webdataset

_PROCEDURAL_EVAL_SIZE = 2048
SPLITS = ("train", "eval")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`scheme[:ARG][?key=value&...]` -> (scheme, ARG, options). Options are what follows the
    last '?' when that part contains '=' (so paths may contain '?')."""
    body, options = spec, {}
    head, sep, tail = spec.rpartition("?")
    if sep and "=" in tail:
        body = head
        for part in tail.split("&"):
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise ValueError(
                    f"source {spec!r}: option {part!r} is not key=value; write options as "
                    "'?key=value&key=value'."
                )
            if key in options:
                raise ValueError(f"source {spec!r}: option {key!r} is given twice; keep one.")
            options[key] = value
    scheme, _, arg = body.partition(":")
    return scheme, arg, options


# ---------------------------------------------------------------------------- shapes, glyphs


class ProceduralRecords:
    """A built-in procedural dataset (`shapes.ShapesSource`, `glyphs.GlyphsSource`) as raw
    records; images come drawn, as uint8 arrays."""

    def __init__(self, name: str, dataset):
        self._name, self._dataset = name, dataset
        self.class_names = dataset.class_names
        self.prompt_templates = dataset.prompt_templates

    def __len__(self) -> int:
        return len(self._dataset)

    def __repr__(self) -> str:
        return repr(self._dataset)

    def __getitem__(self, index: int) -> dict:
        example = self._dataset[index]
        if self._dataset.split == "train":
            del example["label"]
        return {"key": f"{self._name}[{int(index)}]", **example}

    def captions(self, num: int) -> Iterator[str]:
        return self._dataset.captions(num)


_PROCEDURAL = {"shapes": shapes.ShapesSource, "glyphs": glyphs.GlyphsSource}


def _procedural(spec: str, arg: str, options: dict, split: str, seed: int) -> ProceduralRecords:
    name = parse_spec(spec)[0]
    if arg and not (arg.isdigit() and int(arg) > 0):
        raise ValueError(f"source {spec!r}: N must be a positive integer, e.g. '{name}:50000'.")
    if "seed" in options:
        if not options["seed"].isdigit():
            raise ValueError(
                f"source {spec!r}: seed must be a non-negative integer, e.g. '{name}?seed=1'."
            )
        seed = int(options["seed"])
    size = int(arg) if arg else {"train": 100_000, "eval": _PROCEDURAL_EVAL_SIZE}[split]
    return ProceduralRecords(name, _PROCEDURAL[name](split, size=size, seed=seed))


# ---------------------------------------------------------------------------- csv


def _pick_column(spec: str, header: list[str], option: str, given, defaults) -> str | None:
    """The column named by the option, else the first default present (None if none is)."""
    if given is not None:
        if given not in header:
            raise ValueError(
                f"source {spec!r}: no column {given!r} (option {option}=); the columns are "
                f"{', '.join(header)}."
            )
        return given
    return next((name for name in defaults if name in header), None)


class CsvSource:
    """Rows of a CSV/TSV. "train": one record per row. "eval": rows that share an image path
    are one record with all their captions; labels from an optional column of class names."""

    prompt_templates = None

    def __init__(self, spec: str, path: str, split: str, options: dict):
        self.spec, self.path, self.split = spec, path, split
        self._delimiter = "\t" if path.lower().endswith(".tsv") else ","
        # Image paths are relative to the file's folder.
        self._root = os.fspath(paths.path(path).parent)
        if not paths.is_file(path):
            raise ValueError(
                f"source {spec!r}: no such file {path!r}; give the path of a .csv or .tsv file "
                "(relative to the working directory, or absolute)."
            )
        rows = self._rows(csv.reader)
        header = next(rows, [])
        rows.close()
        columns = ", ".join(header)
        self._image = _pick_column(
            spec, header, "image", options.get("image"), ("image", "filepath")
        )
        self._caption = _pick_column(
            spec, header, "caption", options.get("caption"), ("caption", "title", "text")
        )
        self._label = _pick_column(spec, header, "label", options.get("label"), ())
        if self._image is None:
            raise ValueError(
                f"source {spec!r}: no image column (looked for 'image', 'filepath'; the columns "
                f"are {columns}); name it with '?image=COLUMN'."
            )
        if self._caption is None and (split == "train" or self._label is None):
            needs = "a caption column" if split == "train" else "a caption or a label column"
            raise ValueError(
                f"source {spec!r}: {needs} is needed (looked for 'caption', 'title', 'text'; "
                f"the columns are {columns}); name it with '?caption=COLUMN'"
                + ("." if split == "train" else " or '?label=COLUMN'.")
            )
        self._examples, self.class_names = self._read()
        if not self._examples:
            raise ValueError(f"source {spec!r}: {path} has no rows; it needs at least one.")
        self._size = len(self._examples)

    def _rows(self, reader=csv.DictReader) -> Iterator:
        with paths.open_text(self.path) as f:
            yield from reader(f, delimiter=self._delimiter)

    def _read(self) -> tuple[list, list[str] | None]:
        """(examples, class names): "train" examples are (image, caption), "eval" ones
        (image, [captions], label index); a short row has None for its missing fields."""
        if self.split == "train":
            return [(row[self._image], row[self._caption]) for row in self._rows()], None
        grouped = {}  # image -> (captions, class name); insertion-ordered
        for line, row in enumerate(self._rows(), start=2):
            name = row[self._label] if self._label is not None else None
            if self._label is not None and not (name or "").strip():
                raise ValueError(
                    f"source {self.spec!r}: line {line} has an empty {self._label!r}; every "
                    "row of a labelled source needs a class name."
                )
            captions, _ = grouped.setdefault(row[self._image], ([], name))
            if self._caption is not None:
                captions.append(row[self._caption])
        if self._label is None:
            return [(image, caps, None) for image, (caps, _) in grouped.items()], None
        class_names = sorted({name for _, name in grouped.values()})
        index = {name: i for i, name in enumerate(class_names)}
        examples = [(image, caps, index[name]) for image, (caps, name) in grouped.items()]
        return examples, class_names

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_examples"] = None  # re-read by each process that reads records
        return state

    def _example(self, index: int) -> tuple:
        if self._examples is None:
            self._examples = self._read()[0]
            if len(self._examples) != self._size:
                raise ValueError(
                    f"source {self.spec!r}: {self.path} changed while in use (now "
                    f"{len(self._examples)} records, was {self._size})."
                )
        return self._examples[index]

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"CsvSource({self.spec!r}, split={self.split!r}, size={self._size})"

    def __getitem__(self, index: int) -> dict:
        path, *rest = self._example(int(index))
        # Relative to the CSV's folder; an absolute or remote path stays as it is.
        record = {"key": str(path), "image": paths.join(self._root, path) if path else None}
        if self.split == "train":
            record["caption"] = rest[0]
            return record
        if self._caption is not None:
            record["captions"] = rest[0]
        if self._label is not None:
            record["label"] = rest[1]
        return record

    def captions(self, num: int) -> Iterator[str]:
        return records.first_usable((row[self._caption] for row in self._rows()), num)


def _csv(spec: str, arg: str, options: dict, split: str, seed: int) -> CsvSource:
    del seed
    if not arg:
        raise ValueError(f"source {spec!r}: give the file, e.g. 'csv:/data/train.csv'.")
    return CsvSource(spec, paths.local(arg), split, options)


# ---------------------------------------------------------------------------- folder


class FolderSource:
    """`PATH/<class>/<image>`: labelled images, classes in sorted folder-name order."""

    prompt_templates = None

    def __init__(self, spec: str, root: str):
        self.spec = spec
        if not paths.is_dir(root):
            raise ValueError(
                f"source {spec!r}: {root!r} is not a directory; give a folder with one "
                "subfolder of images per class."
            )
        top = paths.path(root)
        folders = sorted(e.name for e in top.iterdir() if e.is_dir() and e.name[0] != ".")
        self._files, labels = [], []
        for label, folder in enumerate(folders):
            names = sorted(
                entry.name
                for entry in (top / folder).iterdir()
                if entry.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            self._files += [f"{folder}/{name}" for name in names]
            labels += [label] * len(names)
        if not self._files:
            raise ValueError(
                f"source {spec!r}: no images in subfolders of {root!r} (extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}); put each class's images in its own subfolder."
            )
        self._root = root
        self._labels = np.array(labels, np.int32)
        self.class_names = [folder.replace("_", " ") for folder in folders]

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"FolderSource({self.spec!r}, size={len(self)})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        path = self._files[index]
        image = paths.join(self._root, path)
        return {"key": path, "image": image, "label": int(self._labels[index])}


def _folder(spec: str, arg: str, options: dict, split: str, seed: int) -> FolderSource:
    del options, seed
    if split == "train":
        raise ValueError(
            f"source {spec!r}: a folder of class subfolders has labels but no captions, so it "
            "cannot be a training source; use it for evaluations, and train on 'csv:', "
            "'arrayrecord:' or 'tfds:' image-caption pairs."
        )
    if not arg:
        raise ValueError(f"source {spec!r}: give the folder, e.g. 'folder:/data/imagenet/val'.")
    return FolderSource(spec, paths.local(arg))


# ---------------------------------------------------------------------------- arrayrecord


class ArrayRecordSource:
    """Shards of msgpack records `{"key", "image": bytes, "caption"}` (`records.pack`)."""

    class_names = None
    prompt_templates = None

    def __init__(self, spec: str, paths: list[str]):
        self.spec = spec
        # Grain's reader opens files lazily and pickles as its list of paths.
        self._data = grain.sources.ArrayRecordDataSource(paths)
        if not len(self._data):
            raise ValueError(f"source {spec!r}: the files hold no records.")

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.spec!r}, size={len(self)})"

    def __getitem__(self, index: int) -> dict:
        record = records.unpack(self._data[int(index)])
        record.setdefault("key", f"record {int(index)}")
        return record

    def captions(self, num: int) -> Iterator[str]:
        records_ = (records.unpack(self._data[i]).get("caption") for i in range(len(self)))
        return records.first_usable(records_, num)


def _arrayrecord(spec: str, arg: str, options: dict, split: str, seed: int) -> ArrayRecordSource:
    del options, split, seed
    if not arg:
        raise ValueError(
            f"source {spec!r}: give a directory or glob, e.g. 'arrayrecord:/data/cc3m'."
        )
    arg = paths.local(arg)
    scheme = arg.partition("://")[0] if paths.is_remote(arg) else ""
    if scheme and scheme not in _ARRAY_RECORD_SCHEMES:
        raise ValueError(
            f"source {spec!r}: array_record reads local and gs:// files, not {scheme}://; copy "
            "the shards to a local disk or a gs:// bucket, or stream tar shards with "
            "'webdataset:'."
        )
    pattern = paths.join(arg, "*.arrayrecord") if paths.is_dir(arg) else arg
    matches = paths.glob(pattern)
    # A glob over the converter's folder also matches index.json and unfinished .tmp shards.
    shards = [p for p in matches if _is_shard(p)]
    if not shards:
        seen = f" (only {', '.join(p.rpartition('/')[2] for p in matches[:3])})" if matches else ""
        raise ValueError(
            f"source {spec!r}: no ArrayRecord shards match {pattern!r}{seen}; write them with "
            "`python -m clipjax.tools.convert --input=... --output=DIR`."
        )
    return ArrayRecordSource(spec, shards)


# The remote schemes array_record's reader opens itself (riegeli's GCS reader).
_ARRAY_RECORD_SCHEMES = ("gs",)


def _is_shard(path: str) -> bool:
    """An ArrayRecord file: clipjax's `*.arrayrecord`, or TFDS's `*.array_record-NNNNN-of-M`."""
    name = path.rpartition("/")[2]
    return (
        not name.endswith(".tmp")
        and (name.endswith(".arrayrecord") or ".array_record" in name)
        and paths.is_file(path)
    )


# ---------------------------------------------------------------------------- webdataset


def _webdataset(spec: str, arg: str, options: dict, split: str, seed: int):
    del seed
    if split != "train":
        raise ValueError(
            f"source {spec!r}: webdataset shards are streamed, for training; evaluate on "
            "random-access data (convert the shards with `python -m clipjax.tools.convert "
            "--input=GLOB --output=DIR` and name 'arrayrecord:DIR')."
        )
    if not arg:
        raise ValueError(
            f"source {spec!r}: give the shards, e.g. "
            "'webdataset:gs://bucket/cc3m/{00000..00331}.tar' or 'webdataset:/data/cc3m/*.tar'."
        )
    buffer = options.get("buffer", str(webdataset.DEFAULT_BUFFER))
    if not (buffer.isdigit() and int(buffer) > 0):
        raise ValueError(
            f"source {spec!r}: buffer must be a positive number of records, e.g. '?buffer=5000'."
        )
    pattern = paths.local(arg)
    if paths.is_dir(pattern):
        pattern = paths.join(pattern, "*.tar")
    shards = [p for p in paths.glob(pattern) if p.endswith((".tar", ".tar.gz", ".tgz"))]
    if not shards:
        raise ValueError(
            f"source {spec!r}: no .tar shards match {pattern!r}; give a glob, a range "
            "('shard-{00000..00099}.tar') or a folder of webdataset tar files."
        )
    return webdataset.WebDatasetSource(spec, shards, int(buffer))


# ---------------------------------------------------------------------------- tfds


def _feature(features, path: str):
    """The feature at a '/'-separated path of a TFDS FeaturesDict, or None."""
    feature = features
    for part in path.split("/"):
        feature = getattr(feature, "feature", feature)  # through a Sequence
        if not hasattr(feature, "keys") or part not in feature:
            return None
        feature = feature[part]
    return feature


def _value(example: dict, path: str):
    for part in path.split("/"):
        example = example[part]
    return example


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).

    Images come decoded by TFDS (uint8 arrays); a caption feature holding several texts gives
    `captions`."""

    prompt_templates = None

    def __init__(self, spec: str, data, split: str, image: str, caption, label):
        self.spec, self._data, self.split = spec, data, split
        self._image, self._caption, self._label = image, caption, label
        self.class_names = None
        if label is not None:
            names = getattr(_feature(data.dataset_info.features, label), "names", None)
            self.class_names = list(names) if names is not None else None

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TfdsSource({self.spec!r}, size={len(self)})"

    def _captions(self, example: dict) -> dict:
        value = _value(example, self._caption)
        if isinstance(value, np.ndarray | list | tuple):
            return {"captions": list(np.asarray(value).reshape(-1))}
        return {"caption": value}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        example = self._data[index]
        record = {"key": f"{self.spec}[{index}]", "image": _value(example, self._image)}
        if self._caption is not None:
            record.update(self._captions(example))
        if self._label is not None and self.split == "eval":
            record["label"] = int(_value(example, self._label))
        return record

    def captions(self, num: int) -> Iterator[str]:
        def all_captions():
            for index in range(len(self)):
                record = self._captions(self._data[index])
                yield from record.get("captions", [record.get("caption")])

        return records.first_usable(all_captions(), num)


def _tfds(spec: str, arg: str, options: dict, split: str, seed: int) -> TfdsSource:
    del seed
    import tensorflow_datasets as tfds  # only for tfds: sources, it is slow to import

    name, _, tfds_split = arg.partition(":")
    if not name:
        raise ValueError(f"source {spec!r}: give the dataset, e.g. 'tfds:cifar10:test'.")
    tfds_split = tfds_split or {"train": "train", "eval": "test"}[split]
    try:
        data = tfds.data_source(
            name, split=tfds_split, data_dir=options.get("data_dir"), download=False
        )
    except Exception as e:  # TFDS raises many kinds; the user needs its first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"source {spec!r}: TFDS cannot open split {tfds_split!r} of {name!r} ({reason}); "
            f"prepare it as ArrayRecord (`tfds build {name} --file_format=array_record`) and "
            "pass its directory with '?data_dir=DIR'."
        ) from None
    features = data.dataset_info.features
    have = ", ".join(sorted(features.keys()))
    image = options.get("image", "image")
    if _feature(features, image) is None:
        raise ValueError(
            f"source {spec!r}: no image feature {image!r} (features: {have}); name it with "
            "'?image=FEATURE'."
        )
    caption, label = options.get("caption"), options.get("label")
    for option, value in (("caption", caption), ("label", label)):
        if value is not None and _feature(features, value) is None:
            raise ValueError(
                f"source {spec!r}: no feature {value!r} (option {option}=; features: {have})."
            )
    if caption is None:
        present = [p for p in ("caption", "text", "captions/text") if _feature(features, p)]
        caption = present[0] if present else None
    if label is None and _feature(features, "label") is not None:
        label = "label"
    if caption is None and (split == "train" or label is None):
        needs = "a caption feature" if split == "train" else "a caption or a label feature"
        raise ValueError(
            f"source {spec!r}: {needs} is needed (looked for 'caption', 'text', "
            f"'captions/text'; features: {have}); name it with '?caption=FEATURE'."
        )
    return TfdsSource(spec, data, split, image, caption, label)


# ---------------------------------------------------------------------------- mix


class Mixture:
    """Training sources drawn in proportion to `weights` (normalised to sum to 1): the
    pipeline shuffles and repeats each `part` on its own and interleaves them
    (`pipeline.train_dataset`), so a small source is upsampled and a large one subsampled.
    Its length is the parts' total."""

    class_names = None
    prompt_templates = None

    def __init__(self, spec: str, parts: list, specs: list[str], weights: list[float]):
        self.spec, self.parts, self.specs = spec, parts, specs
        self.weights = [w / sum(weights) for w in weights]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __repr__(self) -> str:
        shares = ", ".join(f"{s} {w:.1%}" for s, w in zip(self.specs, self.weights, strict=True))
        return f"Mixture({shares})"

    def captions(self, num: int) -> Iterator[str]:
        """Each part's first captions, in proportion to the weights (to train a tokenizer)."""
        for part, weight in zip(self.parts, self.weights, strict=True):
            yield from part.captions(max(1, round(num * weight)))


def _mix(spec: str, arg: str, options: dict, split: str, seed: int) -> Mixture:
    del options
    if split != "train":
        raise ValueError(
            f"source {spec!r}: a mixture is a training source; evaluate on each of its sources."
        )
    parts, specs, weights = [], [], []
    for item in filter(None, arg.split(",")):
        part, at, weight = item.rpartition("@")
        try:
            value = float(weight) if at else None
        except ValueError:
            value = None
        if not part or value is None or not value > 0 or value == float("inf"):
            raise ValueError(
                f"source {spec!r}: {item!r} is not SPEC@WEIGHT with a positive weight; write "
                "'mix:shapes:50000@3,csv:/data/pairs.csv@1'."
            )
        if parse_spec(part)[0] == "mix":
            raise ValueError(f"source {spec!r}: a mixture cannot hold another mixture.")
        if parse_spec(part)[0] == "webdataset":
            raise ValueError(
                f"source {spec!r}: a mixture draws from random-access sources, and webdataset "
                "shards are streamed; convert them to 'arrayrecord:' with "
                "`python -m clipjax.tools.convert`."
            )
        try:
            parts.append(make_source(part, "train", seed=seed))
        except ValueError as e:
            raise ValueError(f"source {spec!r}: {e}") from None
        specs.append(part)
        weights.append(value)
    if not parts:
        raise ValueError(
            f"source {spec!r}: name the sources and their weights, e.g. "
            "'mix:shapes:50000@3,csv:/data/pairs.csv@1'."
        )
    return Mixture(spec, parts, specs, weights)


# name -> (builder, its options, an example spec)
_SCHEMES = {
    "shapes": (_procedural, ("seed",), "shapes:50000"),
    "glyphs": (_procedural, ("seed",), "glyphs:50000"),
    "csv": (_csv, ("image", "caption", "label"), "csv:/data/train.csv?caption=title"),
    "folder": (_folder, (), "folder:/data/imagenet/val"),
    "arrayrecord": (_arrayrecord, (), "arrayrecord:/data/cc3m"),
    "webdataset": (_webdataset, ("buffer",), "webdataset:/data/cc3m/*.tar?buffer=5000"),
    "tfds": (_tfds, ("data_dir", "image", "caption", "label"), "tfds:cifar10:test"),
    "mix": (_mix, (), "mix:shapes:50000@3,csv:/data/pairs.csv@1"),
}


def make_source(spec: str, split: str, *, seed: int = 0):
    """The source named by `spec` for `split`: "train" (image-caption pairs) or "eval"
    (held-out; labels and/or captions). `seed` selects another stream of the procedural
    `shapes` dataset (its `?seed=` option wins). Raises a one-line ValueError naming the spec
    for an unknown scheme or option or a path that matches nothing."""
    if split not in SPLITS:
        raise ValueError(f"source {spec!r}: split {split!r} is not one of {SPLITS}.")
    scheme, arg, options = parse_spec(spec)
    if scheme == "mix":  # its parts' options are theirs
        arg, options = spec.partition(":")[2], {}
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unknown data source {spec!r}; known schemes: {', '.join(sorted(_SCHEMES))} (e.g. "
            "'shapes:50000', 'csv:/data/train.csv' or 'arrayrecord:/data/cc3m')."
        )
    build, known, example = _SCHEMES[scheme]
    if unknown := sorted(set(options) - set(known)):
        takes = f"takes only {', '.join(known)}" if known else "takes no options"
        raise ValueError(
            f"source {spec!r}: unknown option {unknown[0]!r}; a {scheme} source {takes} "
            f"(e.g. {example!r})."
        )
    return build(spec, arg, options, split, seed)


# Records hashed by `fingerprint`: a fixed sample, so that a large ArrayRecord set costs as
# little as a small one.
_FINGERPRINT_SAMPLES = 16


def fingerprint(source) -> dict:
    """What identifies a source's content, cheaply: `{"records": len(source), "sample": a
    hash of _FINGERPRINT_SAMPLES records evenly spaced over it}`. A record's image file (a
    path, as `csv:` gives) is hashed by its bytes, so a replaced image changes it too. A
    mixture's hashes its parts' fingerprints and weights; webdataset shards give `{"shards":
    their number, "sample": ...}` (`WebDatasetSource.fingerprint`)."""
    if isinstance(source, webdataset.WebDatasetSource):
        return source.fingerprint()
    if isinstance(source, Mixture):
        parts = [fingerprint(part) for part in source.parts]
        text = repr([parts, source.weights]).encode()
        return {"records": len(source), "sample": hashlib.sha256(text).hexdigest()[:16]}
    size = len(source)
    indices = sorted(set(np.linspace(0, size - 1, min(size, _FINGERPRINT_SAMPLES)).astype(int)))
    digest = hashlib.sha256()
    for index in indices:
        record = source[int(index)]
        for key in sorted(record):
            digest.update(key.encode())
            digest.update(_value_bytes(key, record[key]))
    return {"records": size, "sample": digest.hexdigest()[:16]}


def _value_bytes(key: str, value) -> bytes:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}".encode() + value.tobytes()
    if isinstance(value, bytes):
        return value
    if key == "image" and isinstance(value, str):  # an image file named by a record
        try:
            return value.encode() + paths.read_bytes(value)
        except OSError:  # missing: the record is skipped when read
            pass
    return repr(value).encode()


def captions(spec: str, num: int = 20_000) -> Iterator[str]:
    """The first `num` usable training captions of `spec`, read lazily (to train a tokenizer)."""
    return make_source(spec, "train").captions(num)
