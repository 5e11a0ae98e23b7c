"""The views of each example an objective asks of the training pipeline. Plain data, below
both the pipeline that makes them and the objectives that declare them."""

import dataclasses

TEXT_VIEWS = ("plain", "mlm", "eda")


@dataclasses.dataclass(frozen=True)
class Views:
    """Which views of each example an objective asks the training pipeline for
    (`data.pipeline.train_dataset` makes them).

    - `image_views` (1 to 3): independent augmentations of the image (`config.data.augment`,
      see `image_ops.Augment`), batch keys `image`, `image_2` and `image_3`, each uint8 (b,
      size, size, 3) (the model standardises them: `models.two_tower.standardize`).
    - `image_augments`: per image view, the `image_ops.Augment` fields (a dict) that replace
      `config.data.augment` for that view, or None to keep it; () keeps it for every view
      (SLIP: a CLIP base view and two MoCo v2 views).
    - `text_views`, int32 (b, context_length) each: "plain" → `text`, the caption; "mlm" →
      `text_mlm`, the caption with BERT-style masking, plus `mlm_labels`, the original ids at
      the masked positions and 0 elsewhere (`text_ops.mlm_mask`); "eda" → `text_eda`, an
      EDA-augmented caption (`text_ops.eda`).
    """

    image_views: int = 1
    text_views: tuple[str, ...] = ("plain",)
    image_augments: tuple[dict | None, ...] = ()

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The batch keys of the image views, in order."""
        return ("image", "image_2", "image_3")[: self.image_views]

    def __post_init__(self):
        if self.image_views not in (1, 2, 3):
            raise ValueError(f"Views.image_views must be 1, 2 or 3, not {self.image_views!r}.")
        augments = tuple(self.image_augments)
        object.__setattr__(self, "image_augments", augments)
        if len(augments) not in (0, self.image_views):
            raise ValueError(
                f"Views.image_augments has {len(augments)} entries for {self.image_views} "
                "image views; give one per view (None keeps config.data.augment), or none."
            )
        views = tuple(self.text_views)
        object.__setattr__(self, "text_views", views)  # a list from a config is fine too
        if not views or len(set(views)) != len(views) or not set(views) <= set(TEXT_VIEWS):
            raise ValueError(
                f"Views.text_views {views!r} must be distinct kinds among {TEXT_VIEWS}."
            )
