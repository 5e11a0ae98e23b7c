"""Training objectives. Each computes its loss from model outputs and keeps its own state.

An objective is built as `Objective(config, mesh)`; see `base.Objective` for what it offers.
"""

from clipjax.objectives.clip import Clip
from clipjax.objectives.cliplite import ClipLite
from clipjax.objectives.declip import DeClip
from clipjax.objectives.defilip import DeFilip
from clipjax.objectives.filip import Filip
from clipjax.objectives.siglip import SigLip
from clipjax.objectives.slip import Slip

OBJECTIVES = {
    "clip": Clip,
    "declip": DeClip,
    "siglip": SigLip,
    "cliplite": ClipLite,
    "slip": Slip,
    "filip": Filip,
    "defilip": DeFilip,
}


def get(name: str):
    """The objective class registered under `name` (config.objective)."""
    if name not in OBJECTIVES:
        raise ValueError(
            f"config.objective={name!r} is unknown; choose one of {sorted(OBJECTIVES)}."
        )
    return OBJECTIVES[name]
