r"""Evaluate a workdir's checkpoint with the evaluations its config lists.

  python -m clipjax.evaluate --workdir=/tmp/clip_local
  python -m clipjax.evaluate --workdir=/tmp/clip_local --step=400 \
      --config.evals.shapes.templates=clip
  python -m clipjax.evaluate --model=/models/ViT-B-32-openai \
      --config=configs/clip_vitb32.py:local

The config is the one the run was trained with (`workdir/config.json`); `--config.evals...`
overrides change its evaluations, and `--config=FILE` replaces it (for evaluations the run did
not list; the model must match the checkpoint). Results are printed as JSON and appended to
`workdir/metrics.jsonl` (and TensorBoard) as `eval/<name>/<metric>` at the checkpoint's step.

`--model=PATH` evaluates any model `clipjax.load` reads (a workdir, a clipjax export, an
open_clip folder) with the evaluations of `--config=FILE`; the model's shapes replace the
config's. Results are printed only.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clipjax import config as config_lib
from clipjax import paths, summary
from clipjax.evaluate import checkpoint_eval
from clipjax.metrics import quiet_library_logs

_SAVED_CONFIG = os.path.join(os.path.dirname(__file__), "saved_config.py")

config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's own.")
flags.DEFINE_string("workdir", None, "A directory clipjax.main trained in.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default: the latest.")
flags.DEFINE_string("model", None, "Instead of --workdir: any model clipjax.load reads.")
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
    print(f"clipjax.evaluate: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """Without `--config`, evaluate with the config saved in `--workdir`."""
    if not any(arg.startswith("--config=") for arg in argv[1:]):
        workdirs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--workdir=")]
        if workdirs:
            if not (paths.path(workdirs[-1]) / "config.json").is_file():
                _fail(
                    f"{workdirs[-1]} has no config.json: --workdir must be a directory "
                    "clipjax.main trained in."
                )
            try:
                config_lib.load_saved(workdirs[-1])
            except config_lib.ConfigError as e:
                _fail(str(e))
            argv = [argv[0], f"--config={_SAVED_CONFIG}:{workdirs[-1]}", *argv[1:]]
    elif error := config_lib.config_file_error(argv):
        _fail(str(error))
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):
        if error := config_lib.override_error(argv):
            _fail(f"--{error}")
        raise
    except flags.Error as e:  # e.g. --step=abc
        _fail(str(e).splitlines()[0])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.model):
        _fail(
            "give --workdir (a directory clipjax.main trained in) or --model (any model "
            "clipjax.load reads, with --config=FILE for its evaluations)."
        )
    if FLAGS.model and FLAGS.config is None:
        _fail("--model needs --config=FILE: the config whose evaluations to run.")
    quiet_library_logs()
    try:
        if FLAGS.model:
            step = None
            results, chance = checkpoint_eval.evaluate_model(FLAGS.config, FLAGS.model)
        else:
            step, results, chance = checkpoint_eval.evaluate(
                FLAGS.config, FLAGS.workdir, FLAGS.step
            )
    except config_lib.ConfigError as e:
        logging.error("%s", e)
        _fail(str(e))
    print(json.dumps({"step": step, **results}, indent=2))
    print(summary.evaluation(results, chance, step, FLAGS.workdir, FLAGS.model))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
