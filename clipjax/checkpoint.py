"""Orbax checkpoints of the whole training state plus the Grain iterator position.

`workdir/checkpoints/<step>/` holds two items: `state` (parameters, optimizer, objective state,
step, RNG) and `data` (the input iterator's state), so a resumed run sees exactly the batches
the uninterrupted run would have. Saves are asynchronous and atomic: a step directory appears
only once it is complete.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from clipjax.config import ConfigError


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, abstract_state) -> None:
        """Raise ConfigError if the latest checkpoint's arrays differ from `abstract_state`."""
        step = self.latest_step()
        if step is None:
            return
        saved = self.manager.item_metadata(step)["state"]
        # The model is its parameters and statistics, plus the objective's state (a queue).
        parts = ("params", "model_state", "objective_state")
        saved_shapes = _shapes({k: saved.get(k, {}) for k in parts})
        wanted_shapes = _shapes({k: getattr(abstract_state, k) for k in parts})
        for path in sorted(set(saved_shapes) | set(wanted_shapes)):
            have, want = saved_shapes.get(path), wanted_shapes.get(path)
            if have != want:
                raise ConfigError(
                    f"{self.directory} holds a checkpoint (step {step}) from an incompatible "
                    f"model: {path} is {have or 'absent'} there but {want or 'absent'} in this "
                    "config. Use a new --workdir, or the config the checkpoint was made with "
                    "(saved as config.json next to it)."
                )

    def restore_state(self, abstract_state, step: int | None = None):
        """The training state of checkpoint `step` (default: the latest), without the input
        iterator: for evaluating a checkpoint."""
        steps = self.manager.all_steps()
        if not steps:
            raise ConfigError(f"{self.directory} holds no checkpoint yet; train first.")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ConfigError(
                f"{self.directory} has no checkpoint of step {step}; it has steps "
                f"{', '.join(map(str, sorted(steps)))}."
            )
        logging.info("Restoring %s/%d", self.directory, step)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state

    def restore(self, abstract_state, data_iterator):
        """Restore the latest checkpoint onto `abstract_state`'s shardings; None if none.

        The data iterator's position is restored in place.
        """
        step = self.latest_step()
        if step is None:
            return None
        logging.info("Resuming from %s/%d", self.directory, step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored.state

    def save(self, step: int, state, data_iterator) -> None:
        """Start an asynchronous save of `state` and the iterator position; returns at once."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,  # the trainer decides when; orbax would also save the first step
        )

    def close(self) -> None:
        """Wait for pending saves; an async save is lost if the process exits first."""
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree) -> dict[str, tuple]:
    """Leaf shapes by '/'-joined key names, alike for saved metadata and live pytrees."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        "/".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        ): tuple(leaf.shape)
        for path, leaf in leaves
    }
