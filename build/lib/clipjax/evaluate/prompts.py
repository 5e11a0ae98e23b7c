"""Class names and prompt templates for zero-shot classification: presets or text files.

Preset lists live in `prompt_data/` next to this file. List files, presets and your own, hold one
entry per line; blank lines and lines starting with `#` are skipped, surrounding spaces dropped.
"""

import importlib.resources
import os

CLASS_PRESETS = {"imagenet": "imagenet.txt", "cifar10": "cifar10.txt", "cifar100": "cifar100.txt"}
SIMPLE_TEMPLATES = ["a photo of a {}."]
TEMPLATE_PRESETS = ("clip", "simple")


def read_list(path: str) -> list[str]:
    """The entries of a list file (see the module docstring)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _preset(filename: str) -> list[str]:
    resource = importlib.resources.files(__package__) / "prompt_data" / filename
    with importlib.resources.as_file(resource) as path:
        return read_list(str(path))


def _from_file(field: str, spec: str) -> list[str]:
    if not os.path.isfile(spec):
        raise ValueError(
            f"{field}={spec!r} is neither a preset nor an existing file; use "
            f"{_presets_hint(field)} or the path of a text file with one entry per line."
        )
    entries = read_list(spec)
    if not entries:
        raise ValueError(f"{field}={spec!r}: the file lists no entries (one per line).")
    return entries


def _presets_hint(field: str) -> str:
    names = CLASS_PRESETS if field == "classes" else TEMPLATE_PRESETS
    return "'' (the source's own), " + ", ".join(repr(n) for n in names)


def class_names(spec: str, source_names) -> list[str]:
    """The class names for the `classes` setting `spec`.

    "" → `source_names` (the source's own; ValueError if it has none); "imagenet" (CLIP's 1000
    curated names, in the sorted-wnid order of ImageNet's class folders), "cifar10", "cifar100"
    (label order); anything else is the path of a list file.
    """
    if not spec:
        if not source_names:
            raise ValueError(
                "classes='': the source has no class names; set classes to "
                f"{', '.join(repr(n) for n in CLASS_PRESETS)} or a file with one name per line."
            )
        return list(source_names)
    if spec in CLASS_PRESETS:
        return _preset(CLASS_PRESETS[spec])
    return _from_file("classes", spec)


def templates(spec: str, source_templates) -> list[str]:
    """The prompt templates for the `templates` setting `spec`; each contains `{}`.

    "" → `source_templates` if the source has any, else `SIMPLE_TEMPLATES`; "clip" → CLIP's 80
    ImageNet templates; "simple" → `SIMPLE_TEMPLATES`; anything else is the path of a list file.
    """
    if not spec:
        return list(source_templates) or list(SIMPLE_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    if spec == "clip":
        return _preset("templates_clip.txt")
    entries = _from_file("templates", spec)
    if bad := [t for t in entries if "{}" not in t]:
        raise ValueError(
            f"templates={spec!r}: every template needs '{{}}' where the class name goes; "
            f"{len(bad)} do not, e.g. {bad[0]!r}."
        )
    return entries


def fill(template_list: list[str], names: list[str]) -> list[str]:
    """Every template filled with every class name, class-major (all of class 0's first)."""
    # str.replace, not str.format: a template may contain other braces.
    return [t.replace("{}", name) for name in names for t in template_list]
