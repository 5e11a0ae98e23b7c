"""Training objectives. Each computes its loss from model outputs and keeps its own state.

An objective is built as `Objective(config, model, mesh)` and offers:
  init_state(rng) -> pytree            extra training state (e.g. a feature queue), may be {}
  loss(params, batch, state, rng) -> (loss, (metrics, new_state))
  embed_images(params, images) / embed_texts(params, tokens) -> (n, d) unit vectors for evals
"""

from clipjax.objectives.clip import Clip

OBJECTIVES = {"clip": Clip}


def get(name: str):
    """The objective class registered under `name` (config.objective)."""
    if name not in OBJECTIVES:
        raise ValueError(
            f"config.objective={name!r} is unknown; choose one of {sorted(OBJECTIVES)}."
        )
    return OBJECTIVES[name]
