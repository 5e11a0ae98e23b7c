"""`--config=clipjax/evaluate/saved_config.py:WORKDIR`: the config a workdir was trained with.

`python -m clipjax.evaluate` passes this for you when no `--config` is given, so that
`--config.evals.<name>.<field>=...` overrides apply to the run's own config.
"""

from clipjax import config as config_lib


def get_config(workdir: str):
    return config_lib.load_saved(workdir)
