"""The few lines a run or an evaluation ends with: each evaluation's final and best value
beside its chance level, where the output is, and the commands that come next."""

import math
import os

from clipjax.metrics import Series, read_metrics, series

# Eval outputs that are a chosen hyperparameter, not a score: no "best", not plotted.
SETTINGS = ("probe_l2",)


def best(points: Series) -> tuple[int, float]:
    """(step, value) of the highest value; the earliest step on ties. NaNs never win."""
    finite = [(step, value) for step, value in points if not math.isnan(value)]
    step, value = max(finite or points, key=lambda p: (p[1], -p[0]))
    return step, value


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def training(workdir: str, chance: dict[str, float]) -> str:
    """The end of `clipjax.main`: the last step, each evaluation's final and best value and
    its chance level (`chance`, by metric), and the next commands."""
    rows, _ = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    metrics = series(rows)
    steps = [step for points in metrics.values() for step, _ in points]
    lines = [f"Trained to step {max(steps, default=0)}; the run is in {workdir}", ""]
    table = []
    for key in [k for k in metrics if k.startswith("eval/")]:  # in the order logged
        points = metrics[key]
        final_step, final = points[-1]
        if key.rpartition("/")[2] in SETTINGS:
            best_cell = "—"
        else:
            best_step, best_value = best(points)
            best_cell = f"{_number(best_value)} (step {best_step})"
        table.append(
            [key, f"{_number(final)} (step {final_step})", best_cell, _number(chance.get(key))]
        )
    if table:
        lines += _table(["evaluation", "final", "best", "chance"], table) + [""]
    return "\n".join(lines + _next_commands(workdir))


def evaluation(
    results: dict[str, float], chance: dict[str, float], step, workdir, model=None
) -> str:
    """The end of `clipjax.evaluate`: each result beside its chance level, and where the
    results were written (`workdir`; None: printed only, for `model`)."""
    if workdir:
        where = f"step {step} of {workdir}, appended to its metrics.jsonl"
    else:
        where = f"the model {model} (printed only)"
    table = [[key, _number(value), _number(chance.get(key))] for key, value in results.items()]
    return "\n".join([f"Evaluated {where}", "", *_table(["evaluation", "value", "chance"], table)])


def _next_commands(workdir: str) -> list[str]:
    return [
        "Next:",
        f"  python -m clipjax.report --workdir={workdir}      # figures and summary.md",
        f"  python -m clipjax.evaluate --workdir={workdir}    # other evaluations",
        f"  python -m clipjax.export --workdir={workdir} --output={workdir}/export  # open_clip",
        f"  python -m clipjax.predict --model={workdir} --images='photos/*.jpg' --labels=cat,dog",
    ]
