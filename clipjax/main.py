r"""Training entry point.

  python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_local

Overrides: `--config.batch_size=256 --config.optim.lr=3e-4`. Multi-host (TPU pods, SLURM): add
`--distributed` on every host; the cluster is detected, or named with `--coordinator=HOST:PORT
--num_processes=N --process_id=I`. A process lost is counted so after `--heartbeat_timeout`
seconds, and JAX's coordination service then ends the others (exit 134); a launcher
(`launch/supervise.py`) stops them at once and says which one was lost.
"""

import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from clipjax import summary, train
from clipjax.config import config_file_error, override_error
from clipjax.distributed import distributed_arguments
from clipjax.errors import ConfigError, Interrupted, TrainingError
from clipjax.metrics import quiet_library_logs

config_flags.DEFINE_config_file("config", None, "Config file (`path.py[:arg]`).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator", None, "--distributed: process 0's HOST:PORT; default: detect.")
flags.DEFINE_integer("num_processes", None, "--distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index, from 0.")
flags.DEFINE_string(
    "coordinator_bind",
    None,
    "--distributed: the HOST:PORT process 0's coordination service listens on (default: every "
    "interface, at the coordinator's port).",
)
flags.DEFINE_integer(
    "heartbeat_timeout",
    30,
    "--distributed: seconds without a heartbeat after which a process counts as lost, and the "
    "coordination service ends the others.",
)
flags.DEFINE_integer(
    "shutdown_timeout", 60, "--distributed: seconds the processes wait for each other at exit."
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


USAGE = "python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/run"


def fail(message: str, status: int = 2):
    print(f"clipjax: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one clear line for each kind of bad command line: a config file
    that does not load, an override of a field that does not exist, a value that does not
    parse, a missing flag."""
    if error := config_file_error(argv):
        fail(str(error))
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):
        if error := override_error(argv):
            fail(f"--{error}")
        raise
    except flags.Error as e:
        missing = [name for name in ("config", "workdir") if f"--{name}=None" in str(e)]
        if missing:
            fail(f"{' and '.join('--' + m for m in missing)} must be given, e.g. {USAGE}")
        fail(str(e).splitlines()[0])


def widen_gloo_sockets() -> None:
    """Work around gloo's TCP transport, which CPU runs of several processes use: its
    reduce-scatter sets each socket's send buffer to the size of its first message, and after a
    tiny first one every later large collective crawls at the pace of delayed ACKs (a test-size
    DeCLIP step took 20 s instead of 1 s at 4 devices per process). One large reduce-scatter
    first raises every buffer to its maximum, once, in about a second."""
    if jax.default_backend() != "cpu" or jax.config.jax_cpu_collectives_implementation != "gloo":
        return
    mesh = jax.make_mesh((jax.device_count(),), ("all",))
    spec, width = jax.sharding.PartitionSpec("all"), 4 * 1024 * 1024  # floats per device
    zeros = jax.make_array_from_callback(
        (jax.device_count(), width),
        jax.sharding.NamedSharding(mesh, spec),
        lambda index: np.zeros((1, width), np.float32),
    )
    scatter = jax.shard_map(
        lambda x: jax.lax.psum_scatter(x, "all", scatter_dimension=1, tiled=True),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
    )
    jax.block_until_ready(jax.jit(scatter)(zeros))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        try:
            arguments = distributed_arguments(
                FLAGS.coordinator,
                FLAGS.num_processes,
                FLAGS.process_id,
                FLAGS.coordinator_bind,
                FLAGS.heartbeat_timeout,
                FLAGS.shutdown_timeout,
            )
        except ConfigError as e:
            fail(str(e))
        jax.distributed.initialize(**arguments)
        widen_gloo_sockets()
    quiet_library_logs()
    logging.info(
        "JAX %s: %d processes, %d devices (%s)",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        chance = train.run(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        logging.error("%s", e)
        fail(str(e))
    except TrainingError as e:
        logging.error("%s", e)
        fail(str(e), status=1)
    except Interrupted as e:  # a checkpoint of the step reached is saved
        logging.warning("%s", e)
        fail(str(e), status=128 + e.signum)
    except KeyboardInterrupt:  # before the loop started: nothing to save yet
        fail("interrupted before training started; nothing was saved.", status=130)
    if jax.process_index() == 0:
        print(summary.training(FLAGS.workdir, chance))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
