"""The shapes exporter writes files that the csv: and folder: sources read back as the data."""

import numpy as np

from clipjax.data import records, shapes, sources
from clipjax.tools import export_shapes


def test_exported_files_read_back_through_the_sources(tmp_path):
    export_shapes.export(str(tmp_path), num_train=6, num_eval=96, num_probe=48, image_size=32)
    train = sources.make_source(f"csv:{tmp_path}/train.csv", "train")
    original = shapes.ShapesSource("train", size=6, render_size=32)
    assert len(train) == 6
    for i in range(6):
        example = records.decode(train[i])
        assert example["caption"] == original[i]["caption"]
        np.testing.assert_array_equal(example["image"], original[i]["image"])  # PNG: lossless

    held_out = sources.make_source(f"folder:{tmp_path}/eval", "eval")
    original = shapes.ShapesSource("eval", size=96, render_size=32)
    assert sorted(held_out.class_names) == sorted(shapes.CLASS_NAMES)
    got = sorted(held_out.class_names[held_out[i]["label"]] for i in range(96))
    want = sorted(shapes.CLASS_NAMES[original[i]["label"]] for i in range(96))
    assert got == want
    probe = sources.make_source(f"folder:{tmp_path}/probe", "eval")
    assert len(probe) == 48 and probe.class_names == held_out.class_names


def test_a_new_folder_with_only_held_out_images(tmp_path):
    """No training images: the folder is made all the same, with an empty train.csv."""
    output = tmp_path / "new" / "shapes"
    export_shapes.export(str(output), num_train=0, num_eval=4, num_probe=0, image_size=32)
    assert (output / "train.csv").read_text().splitlines() == ["image,caption"]
    assert len(sources.make_source(f"folder:{output}/eval", "eval")) == 4
