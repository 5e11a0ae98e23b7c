r"""Where one input worker's time goes, per image: cProfile over the JPEGs of a tar shard.

Each image goes the way a training worker takes it: `records.decode(record, encoded=True)`
(pixels left encoded), then `image_ops.Augment()` at `--size` (the crop decodes the JPEG no
larger than it needs, then resizes). `--full_decode` takes the way before reduced decoding
and uint8 batches instead: the full decode to an array, the crop, and the float32
standardisation on the host. Prints the ms per image of the costliest functions (own time).

  python benchmarks/input_profile.py /tmp/clipjax_input_vs_open_clip/side1000/shard-00000.tar
  python benchmarks/input_profile.py --full_decode .../shard-00000.tar
"""

import argparse
import cProfile
import os
import pstats
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from clipjax.data import image_ops, records  # noqa: E402
from clipjax.models.two_tower import IMAGE_MEAN, IMAGE_STD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shard", help="a .tar of JPEGs")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--full_decode", action="store_true")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    with tarfile.open(args.shard) as tar:
        images = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    augment, rng = image_ops.Augment(), np.random.default_rng(0)

    def worker() -> None:
        for data in images:
            example = records.decode({"image": data}, encoded=not args.full_decode)
            image = augment(example["image"], rng, args.size)
            if args.full_decode:  # as the workers did: float32, standardised on the host
                image = (image.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD

    profile = cProfile.Profile()
    profile.runcall(worker)
    stats = pstats.Stats(profile)
    total = stats.total_tt / len(images) * 1e3
    print(f"{len(images)} images, {total:.2f} ms each; own time per image, costliest first:")
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[: args.top]
    for (path, line, name), (_, calls, own, _, _) in rows:
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        print(f"  {own / len(images) * 1e3:6.2f} ms  {calls / len(images):5.1f} calls  {where}")


if __name__ == "__main__":
    main()
