"""A soak of random faults: a training run killed (SIGKILL) or stopped (SIGTERM) at random
moments, saves and start-up included, and restarted with the same command each time, must end
bitwise equal to an uninterrupted run of the same command.

  python -m clipjax.tools.soak --faults=10                       # :local DeCLIP, 40 steps
  python -m clipjax.tools.soak --config=tests/configs/tiny.py:declip_vitb32 --faults=3 --steps=8
  python -m clipjax.tools.soak --processes=2 --faults=5          # host losses, 2 processes

Both runs are `python -m clipjax.main` as users start it, with a checkpoint every
`--ckpt_every` steps and every step logged. At the end it compares, leaf by leaf and bit for
bit, the last checkpoint's parameters, BatchNorm statistics, optimizer state, objective state
(DeCLIP's queue), step and RNG; and every row of the soaked run's `metrics.jsonl`, steps
logged again after a kill included, with the uninterrupted run's row of that step. With
`--processes=N` both runs are `launch/local.sh N` (N processes of 4 CPU devices), the soaked
one with `--max_restarts=FAULTS`: each fault goes to one of its processes, drawn at random, as
a host is lost, and the launcher stops the others and starts the group again. It prints
each fault and the verdict, writes them to `--output/report.json`, and exits 1 unless every
fault landed and everything is equal.
"""

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import psutil

from clipjax.metrics import read_metrics

# What a fault interrupts, with its odds: start-up (imports, compiling, restoring), a save in
# progress, or training between saves.
MOMENTS = (("starting", 0.2), ("saving", 0.3), ("training", 0.5))
# Metrics that measure the machine, not the run.
TIMINGS = ("train/samples_per_s",)
POLL = 0.01  # seconds between looks at the run's files
# The restarting launcher of runs of several processes.
LOCAL = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "local.sh")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/declip_vitb32.py:local")
    parser.add_argument("--faults", type=int, default=10, help="faults to inject")
    parser.add_argument("--steps", type=int, default=40, help="the run's total_steps")
    parser.add_argument("--ckpt_every", type=int, default=4)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="1: python -m clipjax.main, restarted by the soak; N > 1: launch/local.sh "
        "--max_restarts=FAULTS N, which restarts the group, each fault to one process",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the faults' moments and kinds")
    parser.add_argument(
        "--signals", default="KILL,TERM", help="the faults' signals to draw from (KILL, TERM)"
    )
    parser.add_argument("--output", default="/tmp/clipjax_soak", help="a new or empty folder")
    parser.add_argument(
        "--override",
        action="append",
        default=None,
        help="a --config.FIELD=VALUE for both runs (repeatable; default: NNS on, so that "
        "DeCLIP's queue is read as well as written)",
    )
    args = parser.parse_args(argv)
    if args.override is None:
        args.override = ["--config.declip.nns_weight=0.2"]
    args.signals = args.signals.upper().split(",")
    if not set(args.signals) <= {"KILL", "TERM"} or not args.signals:
        parser.error(f"--signals={','.join(args.signals)}: give KILL, TERM or KILL,TERM.")
    if args.faults < 0 or args.steps < 2 or args.ckpt_every < 1 or args.processes < 1:
        parser.error(
            "--faults must be at least 0, --steps at least 2, --ckpt_every and --processes at "
            "least 1."
        )
    if os.path.isdir(args.output) and os.listdir(args.output):
        parser.error(f"--output={args.output} is not empty; give a new folder.")
    return args


class Run:
    """One start of the command on `workdir`, its output appended to `workdir.log`: `python -m
    clipjax.main`, or with --processes=N, `launch/local.sh --max_restarts=R N`."""

    def __init__(self, args, workdir: str, max_restarts: int = 0):
        self.workdir = workdir
        self.metrics = os.path.join(workdir, "metrics.jsonl")
        flags = [f"--config={args.config}", f"--workdir={workdir}"]
        flags += [f"--config.total_steps={args.steps}", f"--config.ckpt_every={args.ckpt_every}"]
        flags += ["--config.log_every=1", "--config.evals={}", *args.override]
        if args.processes == 1:
            command = [sys.executable, "-m", "clipjax.main", *flags]
        else:
            command = [LOCAL, f"--max_restarts={max_restarts}", str(args.processes), *flags]
        env = {**os.environ, "PYTHONPATH": os.getcwd()}  # configs/ and tests/configs/
        # This interpreter for the launcher's processes too.
        env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
        env["LOGDIR"] = f"{workdir}_logs"
        # One compilation cache for every start: restarts compile in seconds, alike each time.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.output, "xla_cache"))
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        self.started = time.monotonic()
        self.log = f"{workdir}.log"
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        self.alone = args.processes == 1  # else the launcher's processes, `next_start`
        self.processes = [psutil.Process(self.process.pid)] if self.alone else []
        self._offset = _whole_lines_length(self.metrics)  # rows this start writes follow

    def next_start(self, count: int) -> bool:
        """Under the launcher: wait until it has started its `count` processes anew (the
        current ones have ended); False if it ended instead."""
        previous = {p.pid for p in self.processes}
        while self.process.poll() is None:
            with contextlib.suppress(psutil.Error):
                group = [
                    p
                    for p in psutil.Process(self.process.pid).children()
                    if p.pid not in previous and any("--process_id=" in a for a in p.cmdline())
                ]
                if len(group) == count:
                    self.processes = sorted(group, key=_process_id)
                    self._offset = _whole_lines_length(self.metrics)
                    self.started = time.monotonic()
                    return True
            time.sleep(POLL)
        return False

    def running(self) -> bool:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.processes)

    def steps_logged(self) -> list[int]:
        """The steps of the rows this start has written so far."""
        try:
            with open(self.metrics, "rb") as f:
                f.seek(self._offset)
                lines = f.read().split(b"\n")[:-1]  # the last may be partly written
        except FileNotFoundError:
            return []
        return [json.loads(line)["step"] for line in lines if line.strip()]

    def wait_for_step(self, step: int) -> bool:
        """Until this start logs `step` (or a later one); False if it ended first."""
        while self.running():
            if any(s >= step for s in self.steps_logged()):
                return True
            time.sleep(POLL)
        return False

    def saving(self) -> bool:
        folder = os.path.join(self.workdir, "checkpoints")
        return os.path.isdir(folder) and any("tmp" in name for name in os.listdir(folder))

    def wait_start(self) -> None:
        """Until every process of this start has ended."""
        if self.alone:
            self.process.wait()
        else:
            psutil.wait_procs(self.processes)


def _process_id(process: psutil.Process) -> int:
    return next(int(a.split("=")[1]) for a in process.cmdline() if a.startswith("--process_id="))


def _whole_lines_length(path: str) -> int:
    """Bytes up to the last newline: what a resumed run keeps of a file cut mid-line."""
    try:
        with open(path, "rb") as f:
            return f.read().rfind(b"\n") + 1
    except FileNotFoundError:
        return 0


def latest_checkpoint(workdir: str) -> int:
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def reference(args, workdir: str) -> tuple[float, float]:
    """The uninterrupted run; (seconds to its first logged row, median seconds per step)."""
    run = Run(args, workdir)
    arrivals, seen = [], 0
    while run.process.poll() is None:
        steps = run.steps_logged()
        arrivals += [time.monotonic() - run.started] * (len(steps) - seen)
        seen = len(steps)
        time.sleep(POLL)
    if run.process.returncode != 0:
        sys.exit(f"soak: the uninterrupted run failed (exit {run.process.returncode}); see "
                 f"{workdir}.log")  # fmt: skip
    if len(arrivals) < 2:  # every row came at once, at the end
        return 1.0, 0.1
    return arrivals[0], statistics.median(np.diff(arrivals))


def fault(args, run: Run, rng: random.Random, timing: tuple[float, float], left: int) -> dict:
    """Interrupt the start `run` (just begun) at a random moment, early enough that `left` - 1
    more faults find steps still to run: SIGKILL or SIGTERM to one of its processes, drawn at
    random. What happened."""
    first_row, step_seconds = timing
    resumed_from = latest_checkpoint(run.workdir)
    # The steps this fault may land in: its share of those left.
    window = range(
        resumed_from + 1, resumed_from + 1 + max(1, (args.steps - resumed_from) // (left + 1))
    )
    moment = rng.choices([m for m, _ in MOMENTS], [w for _, w in MOMENTS])[0]
    saves = [step for step in window if step % args.ckpt_every == 0]
    if moment == "starting":
        time.sleep(rng.uniform(0, first_row))
    elif moment == "saving" and saves:  # as a save in the window writes
        if run.wait_for_step(rng.choice(saves)):
            deadline = time.monotonic() + 10 * step_seconds
            while not run.saving() and time.monotonic() < deadline:
                time.sleep(POLL / 10)
    else:
        moment = "training"
        run.wait_for_step(rng.choice(window))
        time.sleep(rng.uniform(0, step_seconds))
    kind = rng.choice([signal.SIGKILL, signal.SIGTERM])  # drawn always, so seeds keep moments
    if kind.name[3:] not in args.signals:
        kind = signal.Signals[f"SIG{args.signals[0]}"]
    victim = rng.randrange(args.processes) if args.processes > 1 else 0
    steps, saving = run.steps_logged(), run.saving()
    landed = run.running()
    if landed:
        with contextlib.suppress(psutil.NoSuchProcess):
            run.processes[victim].send_signal(kind)
    signalled = time.monotonic()
    run.wait_start()
    seconds = {"stopped_s": round(time.monotonic() - signalled, 2)}  # every process ended
    if landed and left == 1 and not run.alone and run.next_start(args.processes):
        # The last fault: how long until the launcher's new start trains again.
        while not run.steps_logged() and run.running():
            time.sleep(POLL)
        seconds["training_again_s"] = round(time.monotonic() - signalled, 2)
    where = "starting" if not steps else f"after step {steps[-1]} was logged"
    return {
        "signal": kind.name,
        "process": victim,
        "landed": landed,
        "moment": moment,
        "where": where + (", a save in progress" if saving else ""),
        "resumed_from": resumed_from,
        "exit": run.process.returncode if args.processes == 1 else None,
        "checkpoint_after": latest_checkpoint(run.workdir),
        **seconds,
    }


def restore_state(workdir: str, step: int) -> dict:
    """Checkpoint `step`'s training state, on this process's first device, whatever the
    processes and devices that saved it."""
    import jax  # here: only the comparison needs it

    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device), saved
        )
        return checkpointer.restore(path, target)


def compare(reference_dir: str, soaked_dir: str, step: int) -> dict:
    """Checkpoint `step` of both runs, leaf by leaf and bit for bit, and every logged row of
    the soaked run against the reference's row of that step."""
    want, got = (
        _leaves(restore_state(reference_dir, step)),
        _leaves(restore_state(soaked_dir, step)),
    )
    differ = sorted(
        path
        for path in set(want) | set(got)
        if path not in want
        or path not in got
        or want[path].dtype != got[path].dtype
        or want[path].shape != got[path].shape
        or want[path].tobytes() != got[path].tobytes()
    )
    # A step can have several rows (training, evaluations): a row's step and names find it.
    reference_rows = {
        _row_key(r): _measured(r) for r in read_metrics(f"{reference_dir}/metrics.jsonl")[0]
    }
    soaked_rows, malformed = read_metrics(f"{soaked_dir}/metrics.jsonl")
    rows_differ = [
        row["step"] for row in soaked_rows if _measured(row) != reference_rows.get(_row_key(row))
    ]
    missing = sorted({key[0] for key in set(reference_rows) - set(map(_row_key, soaked_rows))})
    return {
        "arrays": len(want),
        "arrays_differ": differ,
        "parts": sorted({path.split("/")[0] for path in want}),
        "rows": len(soaked_rows),
        "rows_differ": rows_differ,
        "rows_missing": missing,
        "malformed_lines": malformed,
    }


def _leaves(tree) -> dict[str, np.ndarray]:
    import jax  # here: only the comparison needs it

    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _row_key(row: dict) -> tuple:
    return row["step"], tuple(sorted(_measured(row)))


def _measured(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    reference_dir, soaked_dir = (os.path.join(args.output, n) for n in ("reference", "soaked"))
    started = time.monotonic()
    print(f"soak: the uninterrupted run ({args.config}, {args.steps} steps) ...", flush=True)
    timing = reference(args, reference_dir)
    print(f"soak: first row after {timing[0]:.1f} s, then {timing[1]:.2f} s a step", flush=True)
    rng, faults = random.Random(args.seed), []
    # One process is started again by the soak after each fault; a group, by its launcher.
    group = Run(args, soaked_dir, max_restarts=args.faults) if args.processes > 1 else None
    while sum(f["landed"] for f in faults) < args.faults:
        if latest_checkpoint(soaked_dir) == args.steps or len(faults) >= 3 * args.faults:
            break  # the run finished before its faults did: report what landed
        run = group if group else Run(args, soaked_dir)
        if group and not group.next_start(args.processes):
            break
        left = args.faults - sum(f["landed"] for f in faults)
        faults.append(fault(args, run, rng, timing, left))
        f = faults[-1]
        print(
            f"soak: fault {len(faults)}: {f['signal']} to process {f['process']}, {f['moment']} "
            f"({f['where']}; resumed from {f['resumed_from']}) -> exit {f['exit']}, "
            f"checkpoint {f['checkpoint_after']}; every process ended {f['stopped_s']} s after "
            "the signal"
            + (
                f", training again after {f['training_again_s']} s"
                if "training_again_s" in f
                else ""
            )
            + ("" if f["landed"] else " [the run had ended: not counted]"),
            flush=True,
        )
    final = group or Run(args, soaked_dir)
    final.process.wait()
    if final.process.returncode != 0:
        print(f"soak: the last restart failed (exit {final.process.returncode}); see "
              f"{soaked_dir}.log")  # fmt: skip
        return 1
    result = compare(reference_dir, soaked_dir, args.steps)
    landed = sum(f["landed"] for f in faults)
    equal = not (result["arrays_differ"] or result["rows_differ"] or result["rows_missing"])
    report = {"args": vars(args), "faults": faults, "landed": landed, "equal": equal, **result}
    with open(f"{soaked_dir}.log") as log:  # the launcher's line for each fault
        report["launcher"] = [line.strip() for line in log if line.startswith("launch: ")]
    report["seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    kills = sum(f["signal"] == "SIGKILL" for f in faults if f["landed"])
    in_saves = sum("save in progress" in f["where"] for f in faults if f["landed"])
    arrays = "bitwise equal" if not result["arrays_differ"] else "DIFFER"
    rows = "equal" if not (result["rows_differ"] or result["rows_missing"]) else "DIFFER"
    print(
        f"soak: {landed} of {args.faults} faults landed ({kills} SIGKILL, {in_saves} during a "
        f"save). Step {args.steps}: {result['arrays']} arrays ({', '.join(result['parts'])}) "
        f"{arrays}; {result['rows']} logged rows {rows} ({result['malformed_lines']} cut lines "
        f"skipped). {report['seconds']} s; {args.output}/report.json has the details."
    )
    return 0 if equal and landed == args.faults else 1


if __name__ == "__main__":
    sys.exit(main())
