r"""A seeded study of the methods in the scarce-data regime: datasets × methods × seeds.

  python -m clipjax.study --output=/tmp/study
  python -m clipjax.study --output=/tmp/study --datasets=shapes:2000,glyphs:2000 \
      --methods=clip,declip --seeds=0,1,2 --epochs=40 \
      --variant='declip-no_iss=declip:declip.iss_weight=0'

Each run is `python -m clipjax.main` on a method's `:local` config with `data.train` set to the
dataset, `total_steps` = ceil(epochs · N / batch), and evaluations after the last step on the
dataset's held-out split (zero-shot top-1/5 over its classes, retrieval, and a linear probe
fitted on another labelled stream of it). Runs go one after another, so their training speeds
are comparable; a finished run is not redone when the command is repeated (its row is in
`results.jsonl`), and an interrupted one resumes from its checkpoint.

`--wallclock=METHOD` adds equal wall-clock runs: every other method also trains for the time
METHOD took (its steps scaled by the measured ratio of training speeds, per dataset).

Writes into `--output`:
  runs/<dataset>/<method>/s<seed>/   each run's workdir
  results.jsonl                      one row per run: settings, steps, training seconds, metrics
  study.md                           mean ± sd over seeds of every metric, the difference from
                                     CLIP's run of the same seed, and each seed's value, for
                                     every run in results.jsonl
  study.png                          zero-shot top-1 against N per method (mean, ± sd bars)
"""

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from absl import app, flags, logging
from matplotlib.figure import Figure

from clipjax.data import sources
from clipjax.metrics import read_metrics, series

# name -> (config, overrides): the `:local` config of each method, as the README runs them.
METHODS = {
    "clip": ("configs/clip_vitb32.py:local", ()),
    "declip": ("configs/declip_vitb32.py:local", ()),
    "cliplite": ("configs/cliplite_r50.py:local", ()),
    "siglip": ("configs/siglip_vitb16.py:local", ()),
    "slip": ("configs/slip_vitb32.py:local", ()),
    "filip": ("configs/filip_vitb32.py:local", ()),
    "defilip": ("configs/defilip_vitb32.py:local", ()),
}
# Metric (eval/<name>/<metric>) -> column title, in the order of the table.
METRICS = {
    "eval/shapes/zeroshot_top1": "zero-shot top-1",
    "eval/shapes/zeroshot_top5": "zero-shot top-5",
    "eval/shapes_probe/probe_top1": "linear probe top-1",
    "eval/shapes_retrieval/i2t_r1": "i2t R@1",
    "eval/shapes_retrieval/t2i_r1": "t2i R@1",
}
# Overrides every method gets on a dataset: glyphs' orientation carries meaning (a mirrored
# "R" is no letter), so its training views are not flipped.
DATASET_OVERRIDES = {"glyphs": ("data.augment.flip=False",)}
BATCH_SIZE = 128  # the :local batch, which every method's :local config uses
PROCEDURAL = ("shapes", "glyphs")  # datasets with a held-out labelled split

FLAGS = flags.FLAGS


class StudyError(ValueError):
    """A bad flag value; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    method: str
    seed: int
    steps: int
    budget: str  # "steps" (equal steps) or "wallclock" (the --wallclock method's time)

    @property
    def name(self) -> str:
        budget = "" if self.budget == "steps" else "_wallclock"
        return os.path.join(self.dataset.replace(":", "_"), self.method + budget, f"s{self.seed}")


def parse_methods(names: list[str], variants: list[str]) -> dict[str, tuple[str, tuple]]:
    """Method name -> (config, overrides) for every name asked for."""
    table = dict(METHODS)
    for variant in variants:
        name, eq, rest = variant.partition("=")
        base, colon, overrides = rest.partition(":")
        if not (eq and colon and name and base in table):
            raise StudyError(
                f"--variant={variant!r} is not NAME=BASE:field=value;...; BASE must be one of "
                f"{', '.join(table)}."
            )
        table[name] = (table[base][0], table[base][1] + tuple(o for o in overrides.split(";") if o))
    if unknown := [name for name in names if name not in table]:
        raise StudyError(
            f"--methods: unknown {unknown[0]!r}; use {', '.join(table)} or define it with "
            "--variant."
        )
    return {name: table[name] for name in names}


def dataset_size(spec: str) -> int:
    """N of a procedural training set `scheme:N`."""
    scheme, arg, options = sources.parse_spec(spec)
    if scheme not in PROCEDURAL or not arg.isdigit() or options:
        raise StudyError(
            f"--datasets: {spec!r} is not one of {', '.join(f'{s}:N' for s in PROCEDURAL)}; "
            "the study needs a built-in dataset with a held-out labelled split."
        )
    return int(arg)


def command(run: Run, config: str, overrides: tuple, workdir: str, eval_examples: int) -> list:
    """The `python -m clipjax.main` command line of one run."""
    scheme = sources.parse_spec(run.dataset)[0]
    settings = {
        "data.train": run.dataset,
        "seed": run.seed,
        "total_steps": run.steps,
        "eval_every": run.steps,
        "ckpt_every": max(1, run.steps // 4),
        "keep_ckpts": 1,
        "evals.shapes.source": scheme,
        "evals.shapes.num_examples": eval_examples,
        "evals.shapes_retrieval.source": scheme,
        "evals.shapes_retrieval.num_examples": eval_examples,
        "evals.shapes_probe.source": scheme,
        "evals.shapes_probe.num_examples": eval_examples,
        "evals.shapes_probe.train_source": f"{scheme}:2048?seed=1",
    }
    args = [f"--config.{key}={value}" for key, value in settings.items()]
    overrides = DATASET_OVERRIDES.get(scheme, ()) + tuple(overrides)
    args += [f"--config.{override}" for override in overrides]
    main = [sys.executable, "-m", "clipjax.main", f"--config={config}", f"--workdir={workdir}"]
    return main + args


def summarise_run(workdir: str) -> dict:
    """The final evaluation metrics of a finished run, and its training seconds (steps ×
    batch / the median logged samples/s)."""
    rows, _ = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    by_name = series(rows)
    rates = [value for _, value in by_name.get("train/samples_per_s", [])]
    last = max(row["step"] for row in rows)
    out = {name: by_name[name][-1][1] for name in METRICS if name in by_name}
    out["train_s"] = last * BATCH_SIZE / statistics.median(rates) if rates else float("nan")
    return out


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(run: Run, spec: tuple, output: str, eval_examples: int, results_path: str) -> dict:
    workdir = os.path.join(output, "runs", run.name)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "train.log")
    with open(log_path, "a") as log:
        done = subprocess.run(
            command(run, *spec, workdir, eval_examples), stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise RuntimeError(f"run {run.name} failed (exit {done.returncode}); see {log_path}.")
    row = {**dataclasses.asdict(run), **summarise_run(workdir)}
    with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _mean_sd(values: list[float], bold: bool = True, sign: str = "") -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = f"{100 * statistics.mean(values):{sign}.1f}"
    return f"**{mean}** ± {100 * sd:.1f}" if bold else f"{mean} ± {100 * sd:.1f}"


# The columns that compare each run with CLIP's run of the same dataset and seed, equal steps.
PAIRED = {
    "eval/shapes/zeroshot_top1": "zero-shot − CLIP, same seed",
    "eval/shapes_probe/probe_top1": "probe − CLIP, same seed",
}


def _paired(rows: list[dict], clip_rows: list[dict], metric: str) -> str:
    """Mean ± sd over seeds of (this run − CLIP's run with the same seed), in points."""
    clip = {r["seed"]: r[metric] for r in clip_rows if metric in r}
    diffs = [r[metric] - clip[r["seed"]] for r in rows if metric in r and r["seed"] in clip]
    return _mean_sd(diffs, bold=False, sign="+")


def table(results: list[dict]) -> str:
    """Markdown: per dataset, a row per (method, budget) with mean ± sd over seeds of every
    metric, the difference from CLIP's equal-steps run of the same seed (zero-shot and probe,
    mean ± sd over the seeds both have), each seed's zero-shot top-1, the steps and the
    training time."""
    groups = defaultdict(list)
    for row in results:
        groups[(row["dataset"], row["method"], row["budget"])].append(row)
    head = ["dataset", "method", "budget", "steps", "train s", *METRICS.values()]
    head += [*PAIRED.values(), "top-1 by seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (dataset, method, budget), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["seed"])
        cells = [
            dataset,
            method,
            budget.replace("steps", "equal steps").replace("wallclock", "equal time"),
            str(rows[0]["steps"]),
            f"{statistics.mean(r['train_s'] for r in rows):.0f}",
        ]
        cells += [_mean_sd([r[m] for r in rows if m in r]) for m in METRICS]
        is_clip = (method, budget) == ("clip", "steps")
        clip_rows = [] if is_clip else groups.get((dataset, "clip", "steps"), [])
        cells += [_paired(rows, clip_rows, m) for m in PAIRED]
        cells.append(", ".join(f"{100 * r['eval/shapes/zeroshot_top1']:.1f}" for r in rows))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], path: str) -> None:
    """Zero-shot top-1 against N, one panel per dataset family, a line per method and budget."""
    families = sorted({sources.parse_spec(r["dataset"])[0] for r in results})
    fig = Figure(figsize=(5 * len(families), 4), layout="constrained")
    for ax, family in zip(fig.subplots(1, len(families), squeeze=False)[0], families, strict=True):
        lines = defaultdict(lambda: defaultdict(list))
        for row in results:
            if sources.parse_spec(row["dataset"])[0] == family:
                key = row["method"] + (" (equal time)" if row["budget"] == "wallclock" else "")
                lines[key][dataset_size(row["dataset"])].append(row["eval/shapes/zeroshot_top1"])
        for key, points in sorted(lines.items()):
            sizes = sorted(points)
            means = [100 * statistics.mean(points[n]) for n in sizes]
            sds = [100 * statistics.stdev(points[n]) if len(points[n]) > 1 else 0 for n in sizes]
            ax.errorbar(
                sizes,
                means,
                yerr=sds,
                marker="o",
                capsize=3,
                label=key,
                linestyle="--" if "equal time" in key else "-",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"training pairs N ({family}:N)")
        ax.set_ylabel("held-out zero-shot top-1 (%)")
        ax.set_title(f"{family}: mean ± sd over seeds")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plan(datasets, methods, seeds, epochs) -> list[Run]:
    """The equal-steps runs."""
    return [
        Run(
            dataset,
            method,
            int(seed),
            math.ceil(epochs * dataset_size(dataset) / BATCH_SIZE),
            "steps",
        )
        for dataset in datasets
        for seed in seeds
        for method in methods
    ]


def wallclock_plan(results: list[dict], reference: str) -> list[Run]:
    """For each dataset and method other than `reference`: runs whose steps are its equal-steps
    count times the ratio of `reference`'s median training time to the method's."""
    steps_rows = defaultdict(list)
    for row in results:
        if row["budget"] == "steps":
            steps_rows[(row["dataset"], row["method"])].append(row)
    runs = []
    for (dataset, method), rows in sorted(steps_rows.items()):
        if method == reference or (dataset, reference) not in steps_rows:
            continue
        ratio = statistics.median(r["train_s"] for r in steps_rows[(dataset, reference)])
        ratio /= statistics.median(r["train_s"] for r in rows)
        steps = math.ceil(rows[0]["steps"] * ratio)
        runs += [Run(dataset, method, r["seed"], steps, "wallclock") for r in rows]
    return runs


def _key(run) -> tuple:
    if isinstance(run, Run):
        return run.dataset, run.method, run.seed, run.budget
    return run["dataset"], run["method"], run["seed"], run["budget"]


def main(argv) -> None:
    del argv
    try:
        methods = parse_methods(FLAGS.methods, FLAGS.variant)
        if FLAGS.wallclock and FLAGS.wallclock not in methods:
            raise StudyError(f"--wallclock={FLAGS.wallclock!r} is not one of --methods.")
        for dataset in FLAGS.datasets:
            dataset_size(dataset)
    except StudyError as e:
        print(f"clipjax.study: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(FLAGS.output, exist_ok=True)
    results_path = os.path.join(FLAGS.output, "results.jsonl")
    results = read_results(results_path)

    def run_all(runs: list[Run]) -> None:
        done = {_key(row) for row in results}
        todo = [run for run in runs if _key(run) not in done]
        start = time.monotonic()
        for index, run in enumerate(todo):
            if index:
                eta = (time.monotonic() - start) / index * (len(todo) - index) / 60
                logging.info(
                    "run %d/%d %s (%d steps), ETA %.0f min",
                    index + 1,
                    len(todo),
                    run.name,
                    run.steps,
                    eta,
                )
            row = train(run, methods[run.method], FLAGS.output, FLAGS.eval_examples, results_path)
            results.append(row)
            logging.info(
                "%s: zero-shot top-1 %.3f after %.0f s of training",
                run.name,
                row["eval/shapes/zeroshot_top1"],
                row["train_s"],
            )

    runs = plan(FLAGS.datasets, list(methods), FLAGS.seeds, FLAGS.epochs)
    run_all(runs)
    if FLAGS.wallclock:
        planned = {_key(run) for run in runs}
        extra = wallclock_plan([r for r in results if _key(r) in planned], FLAGS.wallclock)
        run_all(extra)
    # Every run this output holds, also those of earlier commands: no configuration is hidden.
    with open(os.path.join(FLAGS.output, "study.md"), "w") as f:
        f.write(table(results))
    figure(results, os.path.join(FLAGS.output, "study.png"))
    print(table(results))


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing the module for its functions
    must not clash with other commands' flags (`clipjax.report` has an --output too)."""
    flags.DEFINE_string(
        "output", None, "Directory for the runs, results.jsonl, study.md and study.png."
    )
    flags.DEFINE_list("datasets", ["shapes:2000", "shapes:10000", "glyphs:2000"], "Training sets.")
    flags.DEFINE_list("methods", ["clip", "declip", "cliplite"], "Methods or --variant names.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each run uses one for everything.")
    flags.DEFINE_float("epochs", 30, "Passes over the training set (steps = ceil(epochs·N/batch)).")
    flags.DEFINE_multi_string(
        "variant",
        [],
        "NAME=BASE:field=value;field=value — a method BASE with config overrides, e.g. "
        "'declip-no_iss=declip:declip.iss_weight=0'.",
    )
    flags.DEFINE_string("wallclock", "", "Also run every other method for this method's time.")
    flags.DEFINE_integer("eval_examples", 2048, "Held-out images per evaluation (2048 = all).")
    flags.mark_flags_as_required(["output"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
