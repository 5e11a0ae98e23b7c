"""A method's `:local` config at test size (`tests/tiny.py`), for runs started as users start
them, from the repo's root:

  python -m clipjax.main --config=tests/configs/tiny.py:declip_vitb32 ...
  python -m clipjax.main --config=tests/configs/tiny.py:clip_vitb32,shapes ...

After the config's name, a comma-separated list keeps only those evaluations.
"""

from tests import tiny


def get_config(arg: str | None = None):
    name, *evals = (arg or "clip_vitb32").split(",")
    config = tiny.tiny_config(name)
    if evals:
        config.evals = {key: config.evals[key] for key in evals}
    return config
