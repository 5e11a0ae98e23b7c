"""Orbax checkpoints of the whole training state plus the Grain iterator position.

`workdir/checkpoints/<step>/` holds two items: `state` (parameters, optimizer, objective state,
step, RNG) and `data` (the input iterator's state), so a resumed run sees exactly the batches
the uninterrupted run would have. Saves are asynchronous and atomic: a step directory appears
only once it is complete.
"""

import errno
import json
import os
import re
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from clipjax import paths, sharding
from clipjax.errors import ConfigError, TrainingError

# Grain's file of one process's input position: process_<index>-of-<count>.json
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _single_writer_for_one_process() -> None:
    """With one process, write each replicated array once instead of splitting it over its
    replicas. Orbax's replica-parallel saving helps many hosts share the writing; within one
    process it only adds a compiled slice per array and device layout (about 100 compilations,
    seconds, on every save of a small model over 8 devices)."""
    if jax.process_count() == 1:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int):
        _single_writer_for_one_process()
        self.directory = paths.path(workdir) / "checkpoints"
        self.keep = keep
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                # A save cut short by a kill leaves a temporary folder; the next run removes it.
                cleanup_tmp_directories=True,
            ),
        )
        self._pending = None  # (step, bytes) of the save started last, until it is on disk
        self._failed = False  # a save failed: the run stops, and closing waits for nothing
        self._space_checked = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, abstract_state) -> None:
        """Raise ConfigError if the latest readable checkpoint's arrays differ from
        `abstract_state` (a damaged one is left to `restore`, which falls back past it)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception:  # noqa: BLE001 - any damage: judge the one before it
                continue
            if saved is not None:  # None: its metadata file is gone
                break
        else:
            return
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
        iterator: for evaluating a checkpoint. ConfigError, in one line, if it does not
        restore."""
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
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        try:
            return self.manager.restore(step, args=args).state
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever broke
            others = sorted(set(steps) - {step})
            hint = f"; pass --step= one of {', '.join(map(str, others))}" if others else ""
            raise ConfigError(
                f"checkpoint {self.directory}/{step} does not restore ({_reason(e)}){hint}."
            ) from None

    def restore(self, abstract_state, data_iterator, *, allow_changed_data: bool = False):
        """Restore the latest checkpoint that restores onto `abstract_state`'s shardings, with
        the data iterator's position (in place); None if there is none. A damaged checkpoint is
        named in one log line, moved to `workdir/damaged_checkpoints/` (kept, not deleted; the
        run will save that step again) and the one before it is tried.

        ConfigError if the position was saved over other data than the iterator's (their
        `sources.fingerprint`s differ), unless `allow_changed_data` (then a warning)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        reasons = []
        source = data_iterator.get_state().get("source")
        try:
            return self._restore_first(
                steps, abstract_state, data_iterator, reasons, (source, allow_changed_data)
            )
        finally:
            if reasons:
                self.manager.reload()

    def _restore_first(self, steps, abstract_state, data_iterator, reasons, source):
        for step in steps:
            # Checked before the state is read: ConfigError if the position cannot move or
            # points into other data.
            positions = self._positions(step)  # the saved input positions, read once
            self._check_source(step, positions[1], *source)
            written_by, batches = self._moved_position(step, *positions)
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if written_by is None:  # the input's position restores as it was saved
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint, whatever broke
                reasons.append(f"{step}: {_reason(e)}")
                self._set_aside(step, e)
                continue
            logging.info("Resuming from %s/%d", self.directory, step)
            if written_by is not None:
                data_iterator.start_at(batches)
                logging.info(
                    "Checkpoint %d was saved by %d process(es), this run has %d: the input "
                    "continues from global batch %d.",
                    step,
                    written_by,
                    jax.process_count(),
                    batches,
                )
            return restored.state
        if steps:
            raise ConfigError(
                f"no checkpoint in {self.directory} restores ({'; '.join(reasons)}); they were "
                "moved to damaged_checkpoints/. Run again to start from step 0."
            )
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move a checkpoint that does not restore to `workdir/damaged_checkpoints/` (process 0
        does; the others only see it gone)."""
        aside = self.directory.parent / "damaged_checkpoints"
        moved = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(moved)
        logging.warning(
            "Checkpoint %s/%d does not restore (%s); moved it to %s and trying the one before it.",
            self.directory,
            step,
            _reason(error),
            moved,
        )

    def _positions(self, step: int) -> tuple[int | None, list[dict]]:
        """(how many processes wrote checkpoint `step`'s input position, their saved states);
        (None, []) when the files are missing (restoring names that)."""
        files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        names = [_PROCESS_FILE.fullmatch(f.name) for f in files]
        written_by = max((int(name[2]) for name in names if name), default=None)
        states = []
        for path in files:
            try:
                states.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # damaged: restoring names it and falls back
                return written_by, []
        return written_by, states

    def _check_source(
        self, step: int, states: list[dict], source: dict | None, allow_changed: bool
    ) -> None:
        """ConfigError (a warning when `allow_changed`) if checkpoint `step`'s input position
        was saved over a training source whose fingerprint is not `source`."""
        saved = next((s["source"] for s in states if "source" in s), None)
        if source is None or saved is None or saved == source:
            return
        where = f"{self.directory}/{step}"
        if saved.get("readers") != source.get("readers"):  # webdataset shards' readers
            raise ConfigError(
                f"checkpoint {where} was saved while {saved.get('readers')} readers (processes "
                f"× config.data.num_workers) streamed the webdataset shards, and this run has "
                f"{source.get('readers')}, which would read other shards; resume with the same "
                "processes and config.data.num_workers, or train in a new --workdir "
                "(--config.init_from=WORKDIR starts from its weights)."
            )
        (count, unit), (saved_count, saved_unit) = _holds(source), _holds(saved)
        if (count, unit) == (saved_count, saved_unit):
            change = f"holds {count} {unit} as before, but the sampled ones differ"
        else:
            then = saved_count if saved_unit == unit else f"{saved_count} {saved_unit}"
            change = f"holds {count} {unit}, {then} when it was saved"
        if allow_changed:
            logging.warning(
                "The training data changed since checkpoint %s (it %s); resuming anyway "
                "(config.data.allow_changed): the restored input position points into the new "
                "data, so the run does not continue on the batches it would have seen.",
                where,
                change,
            )
            return
        raise ConfigError(
            f"the training data (config.data.train) changed since checkpoint {where}: it "
            f"{change}, so the saved input position points into other data. Restore the data, "
            "train in a new --workdir (--config.init_from=WORKDIR starts from its weights), or "
            "resume anyway with --config.data.allow_changed=True."
        )

    def _moved_position(
        self, step: int, written_by: int | None, states: list[dict]
    ) -> tuple[int | None, int | None]:
        """Given `_positions(step)`: (processes that wrote checkpoint `step`'s input position,
        the global batch that follows it) when that count is not this run's; (None, None)
        when it is (or the files are missing: restoring names that). ConfigError if the
        position cannot move."""
        if written_by in (None, jax.process_count()) or not states:
            return None, None
        how = (
            f"resume it with {written_by} processes (e.g. launch/local.sh {written_by} ...), or "
            "start a new --workdir"
        )
        where = f"checkpoint {self.directory}/{step} was written by {written_by} processes"
        if len(states) != written_by or any("batches" not in s for s in states):
            raise ConfigError(
                f"{where}, and its input position cannot move to {jax.process_count()}: it "
                f"lacks the global position of some process; {how}."
            )
        skipped = sum(s["skipped"] for s in states)
        if skipped:
            raise ConfigError(
                f"{where}, and its input position cannot move to {jax.process_count()}: "
                f"{skipped} bad records had been skipped, and each process filled their "
                f"places from its own rows; {how}."
            )
        return written_by, states[0]["batches"]

    def save(self, step: int, state, data_iterator) -> None:
        """Start an asynchronous save of `state` and the iterator position; returns once the
        previous save is on disk (Orbax waits for it anyway).

        TrainingError, in one line, if the previous save failed, or if the disk has less room
        than a checkpoint takes; the checkpoints before stay intact and no temporary folder is
        left. The first save warns when fewer than `keep` + 1 checkpoints fit (Orbax writes a
        new checkpoint before it deletes the oldest)."""
        self.wait()
        needed = self._checkpoint_bytes(state)
        free = sharding.gather_objects(paths.free_bytes(self.directory))[0]  # process 0's
        if free is not None and free < needed:
            raise self._failure(step, "the disk is too full to hold it", needed)
        if free is not None and not self._space_checked and free < (self.keep + 1) * needed:
            logging.warning(
                "%s has %s free, and a checkpoint takes about %s: fewer than "
                "config.keep_ckpts + 1 = %d fit, so the run will stop when the disk fills. "
                "Free space, lower config.keep_ckpts, or use another --workdir.",
                self.directory,
                _size(free),
                _size(needed),
                self.keep + 1,
            )
        self._space_checked = True
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                ),
                force=True,  # the trainer decides when; orbax would also save the first step
            )
        except Exception as e:  # noqa: BLE001 - a full disk, or any other I/O error
            raise self._failure(step, _write_reason(e), needed) from None
        self._pending = (step, needed)

    def wait(self) -> None:
        """Block until every started save is on disk; TrainingError, in one line, if one
        failed (see `save`)."""
        if self._pending is None:
            return
        (step, needed), self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a full disk, or any other I/O error
            raise self._failure(step, _write_reason(e), needed) from None

    def close(self) -> None:
        """Wait for pending saves (an async save is lost if the process exits first); then
        TrainingError if one failed."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure was reported, by `wait` or `save`
                if not self._failed:
                    raise

    def _checkpoint_bytes(self, state) -> int:
        """What one checkpoint of `state` takes: its arrays' bytes, or the last checkpoint's
        size on disk where that is more."""
        arrays = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes"))
        return max(arrays, self._saved_bytes())

    def _saved_bytes(self) -> int:
        """The size of the latest checkpoint's files (0 if none, or remote)."""
        latest = self._finished_steps()[-1:]
        if not latest or paths.is_remote(self.directory):
            return 0
        folder = os.fspath(self.directory / str(latest[0]))
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder)
            for name in names
        )

    def _finished_steps(self) -> list[int]:
        """The steps whose checkpoints are whole (Orbax renames a folder to its step once
        the save is complete), from the directory itself."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _failure(self, step: int, reason: str, needed: int) -> TrainingError:
        """Remove what the failed save of `step` left, and the one line that stops the run."""
        self._failed = True
        self._pending = None
        if jax.process_index() == 0:
            for unfinished in self.directory.glob("*.orbax-checkpoint-tmp*"):
                _remove(unfinished)
        free = sharding.gather_objects(paths.free_bytes(self.directory))[0]
        steps = self._finished_steps()
        last = (
            f"the last good checkpoint, {self.directory}/{steps[-1]}, is intact: run the same "
            "command to resume from it"
            if steps
            else "no checkpoint was saved yet: run the same command to start again"
        )
        room = "" if free is None else f" and {_size(free)} are free there"
        return TrainingError(
            f"could not save checkpoint {self.directory}/{step} ({reason}): it needs about "
            f"{_size(needed)}{room}. Free space, lower config.keep_ckpts (now {self.keep}) or "
            f"use another --workdir; {last}."
        )


def _size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def _remove(folder) -> None:
    """Remove an unfinished checkpoint folder; writes of the failed save still in flight may
    recreate files in it for a moment, so try a few times."""
    for _ in range(5):
        try:
            folder.rmtree()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.2)
    logging.warning("Could not remove %s, the rest of a failed save; remove it by hand.", folder)


def _write_reason(error: Exception) -> str:
    """Why a save failed, in a few words: a full disk named as such (tensorstore reports it
    deep in a long message), anything else as `_reason`."""
    if "No space left on device" in str(error) or getattr(error, "errno", None) == errno.ENOSPC:
        return "the disk is full"
    return _reason(error)


def _reason(error: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _shapes(tree) -> dict[str, tuple]:
    """Leaf shapes by '/'-joined key names, alike for saved metadata and live pytrees."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        "/".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        ): tuple(leaf.shape)
        for path, leaf in leaves
    }


def _holds(fingerprint: dict) -> tuple[int, str]:
    """What a `sources.fingerprint` counts: (N, "records"), or (N, "shards") for a stream."""
    if "records" in fingerprint:
        return fingerprint["records"], "records"
    return fingerprint["shards"], "shards"
