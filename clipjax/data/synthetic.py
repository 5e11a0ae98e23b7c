"""What the built-in datasets share: a Grain random-access source whose example `index` of a
split is drawn from its own generator, `np.random.default_rng([seed, split_id, index])`, so
that it needs no files and every example is the same on every host and every run.

A dataset module subclasses `SyntheticSource` with its `name`, `class_names` and
`prompt_templates`, and three functions: `sample(rng, split, index)` (what the example shows),
`caption(spec, rng)` and `render(spec, side)`, plus `label(spec)`.
"""

from collections.abc import Iterator

import numpy as np

SPLIT_IDS = {"train": 0, "eval": 1}


class SyntheticSource:
    """`source[i]` is `{"image": uint8 (render_size, render_size, 3), "caption": str,
    "label": int32}`, `label` being an index in `class_names`."""

    name: str
    class_names: list[str]
    prompt_templates: tuple[str, ...]

    def __init__(
        self, split: str = "train", size: int = 100_000, render_size: int = 64, seed: int = 0
    ):
        if split not in SPLIT_IDS:
            raise ValueError(
                f"{self.name}: unknown split {split!r}; expected one of {list(SPLIT_IDS)}."
            )
        self.split, self.size, self.render_size, self.seed = split, size, render_size, seed

    # The dataset's own parts (static: they see only what they are given).
    @staticmethod
    def sample(rng: np.random.Generator, split: str, index: int):
        raise NotImplementedError

    @staticmethod
    def caption(spec, rng: np.random.Generator) -> str:
        raise NotImplementedError

    @staticmethod
    def render(spec, side: int) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def label(spec) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, size={self.size}, seed={self.seed})"

    def spec_and_caption(self, index: int) -> tuple[object, str]:
        """What example `index` shows, and its caption, without drawing it."""
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        spec = self.sample(rng, self.split, index)
        return spec, self.caption(spec, rng)

    def __getitem__(self, index: int) -> dict:
        spec, caption = self.spec_and_caption(index)
        return {
            "image": self.render(spec, self.render_size),
            "caption": caption,
            "label": np.int32(self.label(spec)),
        }

    def captions(self, num: int) -> Iterator[str]:
        """The captions of examples 0..num-1 (without drawing the images), e.g. for tokenizers."""
        for index in range(min(num, self.size)):
            yield self.spec_and_caption(index)[1]
