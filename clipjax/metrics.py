"""One metrics path: `metrics.jsonl`, TensorBoard event files and a console progress line."""

import json
import os
import time
from collections import defaultdict

import jax
from absl import logging
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard files (process 0 only).

    Each JSONL line is `{"step": int, "<name>": float, ...}`. Appending keeps the history of an
    interrupted run, so a resumed run continues the same file.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
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
    if not os.path.exists(path):
        raise MetricsFileError(f"{path} does not exist; pass the --workdir of a training run.")
    rows, malformed = [], 0
    with open(path) as f:
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

    def rate(self, step: int) -> tuple[float, float]:
        """Samples/s since the last call, and the seconds left at that rate."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        return steps_per_s * self.batch_size, eta

    def line(self, step: int, loss: float, samples_per_s: float, eta_s: float) -> str:
        minutes, seconds = divmod(int(eta_s), 60)
        hours, minutes = divmod(minutes, 60)
        width = len(str(self.total_steps))
        return (
            f"step {step:>{width}}/{self.total_steps}  loss {loss:.4f}  "
            f"{samples_per_s:,.0f} samples/s  ETA {hours:d}:{minutes:02d}:{seconds:02d}"
        )

    def log(self, step: int, loss: float) -> float:
        """Log the progress line; returns samples/s for the metrics."""
        samples_per_s, eta = self.rate(step)
        logging.info(self.line(step, loss, samples_per_s, eta))
        return samples_per_s
