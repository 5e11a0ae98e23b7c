r"""Figures and a summary of a training run, from its `metrics.jsonl`.

  python -m clipjax.report --workdir=/tmp/clip_local
  python -m clipjax.report --workdir=/tmp/clip_local --output=/tmp/clip_local_report

Writes to `--output` (default WORKDIR/report):
  training.png   loss terms (every train/loss* key), logit scale, learning rate, gradient norm
  evals.png      one panel per evaluation (eval/<name>/<metric>) over steps
  summary.md     the run (last step, median samples/s), final and best value of every eval
                 metric, final training losses
Works on a run in progress: a half-written line (a run killed mid-write) is skipped and counted.
"""

import math
import os
import statistics
import sys
from collections import defaultdict

from absl import app, flags
from matplotlib.figure import Figure

from clipjax.metrics import MetricsFileError, Series, read_metrics, series
from clipjax.summary import SETTINGS, best

flags.DEFINE_string("workdir", None, "Training run directory (holds metrics.jsonl).")
flags.DEFINE_string("output", None, "Directory for the report; default WORKDIR/report.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def eval_groups(metrics: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """eval/<name>/<metric> → {name: {metric: series}}."""
    groups: dict[str, dict[str, Series]] = defaultdict(dict)
    for key, points in metrics.items():
        parts = key.split("/")
        if parts[0] == "eval" and len(parts) == 3:
            groups[parts[1]][parts[2]] = points
    return dict(groups)


def _loss_names(metrics: dict[str, Series]) -> list[str]:
    return [name for name in metrics if name.startswith("train/loss")]


def _plot(ax, points: Series, **kwargs) -> None:
    ax.plot([s for s, _ in points], [v for _, v in points], **kwargs)


def _panels(count: int, max_cols: int, panel_width: float):
    """A figure of `count` panels, in rows of at most `max_cols`, and those panels' axes."""
    cols = min(max_cols, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(panel_width * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _label(ax, title: str, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def plot_training(metrics: dict[str, Series], path: str) -> bool:
    """training.png; False (nothing written) when there are no training metrics."""
    panels = []
    if losses := _loss_names(metrics):
        panels.append(("loss", losses))
    for name, title in [
        ("train/logit_scale", "logit scale (1 / temperature)"),
        ("train/lr", "learning rate"),
        ("train/grad_norm", "gradient norm"),
    ]:
        if name in metrics:
            panels.append((title, [name]))
    if not panels:
        return False
    fig, axes = _panels(len(panels), max_cols=2, panel_width=6.5)
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            total = name == "train/loss" and len(names) > 1
            style = {"color": "black", "linewidth": 2.0} if total else {"linewidth": 1.2}
            _plot(ax, metrics[name], label=name.removeprefix("train/"), **style)
        _label(ax, title, legend=len(names) > 1)
    fig.savefig(path, dpi=100)
    return True


def plot_evals(groups: dict[str, dict[str, Series]], path: str) -> bool:
    """evals.png, one panel per evaluation; False (nothing written) when there are none."""
    if not groups:
        return False
    fig, axes = _panels(len(groups), max_cols=3, panel_width=5.5)
    for ax, (name, group) in zip(axes, groups.items(), strict=True):
        for metric, points in group.items():
            if metric not in SETTINGS:
                _plot(ax, points, marker="o", markersize=3, label=metric)
        _label(ax, name, legend=True)
    fig.savefig(path, dpi=100)
    return True


def summary(workdir: str, metrics: dict[str, Series], malformed: int) -> str:
    """summary.md text: the run, a table of eval metrics (final, best), final training losses."""
    last_step = max(step for points in metrics.values() for step, _ in points)
    lines = ["# Training report", "", f"- workdir: `{workdir}`", f"- last step: {last_step}"]
    if speed := metrics.get("train/samples_per_s"):
        median = statistics.median(v for _, v in speed)
        lines.append(f"- samples/s: {median:,.0f} (median of {len(speed)} log rows)")
    if skipped := metrics.get("data/skipped"):
        lines.append(f"- bad records skipped by the input: {sum(v for _, v in skipped):.0f}")
    if malformed:
        lines.append(f"- malformed metrics.jsonl lines skipped: {malformed}")

    lines += ["", "## Evaluations", ""]
    groups = eval_groups(metrics)
    if groups:
        lines += ["| metric | final | step | best | best step |", "|---|---|---|---|---|"]
        for name, group in groups.items():
            for metric, points in group.items():
                step, value = points[-1]
                if metric in SETTINGS:
                    best_cells = "— | —"
                else:
                    best_step, best_value = best(points)
                    best_cells = f"{best_value:.6g} | {best_step}"
                lines.append(f"| eval/{name}/{metric} | {value:.6g} | {step} | {best_cells} |")
    else:
        lines.append("No evaluation rows yet.")

    lines += ["", "## Final training values", ""]
    names = _loss_names(metrics) + [n for n in ["train/logit_scale"] if n in metrics]
    if names:
        lines += ["| metric | value | step |", "|---|---|---|"]
        for name in names:
            step, value = metrics[name][-1]
            lines.append(f"| {name} | {value:.6g} | {step} |")
    else:
        lines.append("No training rows yet.")
    return "\n".join(lines) + "\n"


def report(workdir: str, output: str | None = None) -> tuple[list[str], list[str]]:
    """Writes the report; returns (paths written, notes on what was left out)."""
    output = output or os.path.join(workdir, "report")
    rows, malformed = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    metrics = series(rows)
    os.makedirs(output, exist_ok=True)
    written, notes = [], []
    if malformed:
        notes.append(f"skipped {malformed} malformed line(s) of metrics.jsonl")
    path = os.path.join(output, "training.png")
    if plot_training(metrics, path):
        written.append(path)
    else:
        notes.append("no training metrics yet: training.png not written")
    path = os.path.join(output, "evals.png")
    if plot_evals(eval_groups(metrics), path):
        written.append(path)
    else:
        notes.append("no evaluation rows yet: evals.png not written")
    path = os.path.join(output, "summary.md")
    with open(path, "w") as f:
        f.write(summary(workdir, metrics, malformed))
    written.append(path)
    return written, notes


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        written, notes = report(FLAGS.workdir, FLAGS.output)
    except MetricsFileError as e:
        print(f"clipjax.report: {e}", file=sys.stderr)
        sys.exit(2)
    for note in notes:
        print(f"note: {note}")
    for path in written:
        print(path)


if __name__ == "__main__":
    app.run(main)
