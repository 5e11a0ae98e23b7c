"""A method's `:local` config at test size (`tests/tiny.py`), for runs started as users start
them: `python -m clipjax.main --config=tests/configs/tiny.py:declip_vitb32 ...` (from the repo's
root)."""

from tests import tiny


def get_config(arg: str | None = None):
    return tiny.tiny_config(arg or "clip_vitb32")
