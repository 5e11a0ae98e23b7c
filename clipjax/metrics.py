"""One metrics path: `metrics.jsonl`, TensorBoard event files and a console progress line."""

import json
import logging as pylogging
import sys
import time
import uuid
from collections import defaultdict

import jax
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from clipjax import paths


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO lines of libraries that log every save (Orbax prints its whole options),
    which would bury the progress line; their warnings and errors still show, without the
    tracebacks of Orbax's threads: `checkpoint.Checkpointer` reports a failed save itself."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        return record.levelno >= pylogging.WARNING


class _QuietOrbaxTasks(pylogging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's read tasks: when one
    array of a damaged checkpoint fails to read, the others' failures repeat it, each with a
    page of tensorstore spec. The checkpoint's own error is reported once, in one line."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and "orbax" in message)


class _QuietClosedLoop:
    """`sys.unraisablehook` without "Event loop is closed": when a save fails (a full disk),
    Orbax closes its event loop while tensorstore still completes the other writes, and each
    completion's callback into that loop raises it, hundreds of times. The failure itself is
    reported once, by `checkpoint.Checkpointer`. Other unraisable errors go to `hook`."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.hook(unraisable)


# Grain's worker processes, stopped while one batch is on its way to the trainer, can leave
# that batch's shared-memory blocks to multiprocessing's resource tracker, which unlinks them at
# exit and warns of each ("leaked shared_memory objects"). The blocks of every batch the trainer
# received are freed by the input itself (`pipeline._PositionedIterator`); these few are
# Grain's own, past reach, and cleaned up. The tracker is a separate process, started with
# the interpreter's -W options: so the filter goes there, before Grain starts it.
_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def quiet_library_logs() -> None:
    """Install the filters above: on absl's log handler, on asyncio's logger and on
    unraisable errors (once); and the resource tracker's warning of Grain's last shared-memory
    blocks."""
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())
    if not isinstance(sys.unraisablehook, _QuietClosedLoop):
        sys.unraisablehook = _QuietClosedLoop(sys.unraisablehook)
    tasks = pylogging.getLogger("asyncio")
    if not any(isinstance(f, _QuietOrbaxTasks) for f in tasks.filters):
        tasks.addFilter(_QuietOrbaxTasks())


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard files (process 0 only).

    Each JSONL line is `{"step": int, "<name>": float, ...}`. Appending keeps the history of an
    interrupted run, so a resumed run continues the same file.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            workdir = paths.path(workdir)
            self._jsonl = paths.GrowingFile(workdir / "metrics.jsonl")
            if self._jsonl.dropped:
                logging.warning(
                    "%s: dropped its last line, cut mid-write (%d characters); appending after "
                    "the last whole row.",
                    workdir / "metrics.jsonl",
                    len(self._jsonl.dropped),
                )
            # A writer's own suffix: a run resumed within the same second as the last one
            # started would otherwise get its event file's name, and replace it.
            suffix = f".{uuid.uuid4().hex[:8]}"
            self._tb = SummaryWriter(paths.tensorboard_dir(workdir), filename_suffix=suffix)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self._jsonl.append(json.dumps({"step": int(step), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


Series = list[tuple[int, float]]


class MetricsFileError(Exception):
    """No report can be made (no metrics file, or no complete rows in it)."""


def read_metrics(path: str) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl, and the number of malformed lines skipped.

    A run killed mid-write leaves a truncated line; a resumed run then appends after it.
    """
    if not epath.Path(path).exists():
        raise MetricsFileError(f"{path} does not exist; pass the --workdir of a training run.")
    rows, malformed = [], 0
    with epath.Path(path).open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                malformed += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                malformed += 1
    if not rows:
        raise MetricsFileError(
            f"{path} has no complete metrics rows yet; train for at least log_every steps."
        )
    return rows, malformed


def series(rows: list[dict]) -> dict[str, Series]:
    """Name → [(step, value)] sorted by step. A step logged twice (a run resumed from an earlier
    checkpoint redoes steps) keeps its latest value."""
    by_name: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        for name, value in row.items():
            if name != "step":
                by_name[name][row["step"]] = float(value)
    return {name: sorted(values.items()) for name, values in sorted(by_name.items())}


class Progress:
    """Console line with step, loss, samples/s and ETA, measured between calls."""

    def __init__(self, total_steps: int, batch_size: int, first_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = first_step, time.perf_counter()

    def rate(self, step: int) -> tuple[float | None, float | None]:
        """Samples/s since the last call, and the seconds left at that rate; (None, None) when
        no step was taken since (e.g. the first step is also a logging step)."""
        now = time.perf_counter()
        steps, seconds = step - self._last_step, now - self._last_time
        self._last_step, self._last_time = step, now
        if steps <= 0 or seconds <= 0:
            return None, None
        return steps / seconds * self.batch_size, (self.total_steps - step) * seconds / steps

    def line(self, step: int, loss: float, samples_per_s: float | None, eta_s: float | None) -> str:
        width = len(str(self.total_steps))
        head = f"step {step:>{width}}/{self.total_steps}  loss {loss:.4f}"
        if samples_per_s is None:
            return f"{head}  (rate after the next steps)"
        minutes, seconds = divmod(int(eta_s), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{head}  {samples_per_s:,.0f} samples/s  ETA {hours:d}:{minutes:02d}:{seconds:02d}"

    def log(self, step: int, loss: float) -> float | None:
        """Log the progress line; returns samples/s for the metrics (None: not measured)."""
        samples_per_s, eta = self.rate(step)
        logging.info(self.line(step, loss, samples_per_s, eta))
        return samples_per_s
