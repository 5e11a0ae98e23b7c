r"""Training entry point.

  python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_local

Overrides: `--config.batch_size=256 --config.optim.lr=3e-4`. Multi-host (TPU pods, SLURM): add
`--distributed` on every host.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clipjax import train
from clipjax.config import ConfigError, override_error

config_flags.DEFINE_config_file("config", None, "Config file (`path.py[:arg]`).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one clear line for an override of a field that does not exist."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):
        if error := override_error(argv):
            print(f"clipjax: --{error}", file=sys.stderr)
            sys.exit(2)
        raise


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        jax.distributed.initialize()
    logging.info(
        "JAX %s: %d processes, %d devices (%s)",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        train.run(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        logging.error("%s", e)
        print(f"clipjax: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
