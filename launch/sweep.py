r"""Expand a hyper-parameter grid into clipjax.main commands, one per line.

  python launch/sweep.py configs/clip_vitb32.py:local /tmp/sweep \
      optim.lr=1e-3,2e-3 seed=0,1,2 | sh

Each command gets its own workdir, named after its overrides.
"""

import itertools
import shlex
import sys


def commands(config: str, root: str, axes: list[str]) -> list[str]:
    names, values = zip(*(axis.split("=", 1) for axis in axes), strict=True) if axes else ((), ())
    out = []
    for combo in itertools.product(*(v.split(",") for v in values)):
        overrides = [f"--config.{n}={v}" for n, v in zip(names, combo, strict=True)]
        tag = "_".join(f"{n.split('.')[-1]}{v}" for n, v in zip(names, combo, strict=True))
        workdir = f"{root}/{tag or 'base'}"
        args = ["python", "-m", "clipjax.main", f"--config={config}", f"--workdir={workdir}"]
        out.append(shlex.join(args + overrides))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print("\n".join(commands(sys.argv[1], sys.argv[2], sys.argv[3:])))
