"""Two processes against one, started as users start them: `launch/local.sh 2 ARGS`, i.e.
`python -m clipjax.main --distributed ... ARGS` twice, with gloo collectives and a coordinator
on localhost.

The same global batches, the same per-step losses (within 1e-6) and the same evaluations on 2
processes × 4 CPU devices as on 1 × 8: CLIP resumed on 2 processes from a 1-process
checkpoint; DeCLIP with synced SimSiam BatchNorm and its feature queue, stopped by a SIGTERM to
one process (both stop at the same step with a checkpoint) and resumed on 1 process.

Every run here, the 1-process ones included, is a subprocess compiled at XLA's default
optimisation, as users run: the rest of the suite compiles unoptimised code (`conftest.py`),
whose sums round differently, and the 1e-6 promise is made of what users run.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import psutil
import pytest

from clipjax.metrics import read_metrics, series
from tests.configs import tiny as tiny_configs

ROOT = pathlib.Path(__file__).parent.parent
STEPS = 6
# Every run's settings (checkpoints only at a stop and at the end), in-process and as flags.
SETTINGS = {"total_steps": STEPS, "log_every": 1, "eval_every": 1000, "ckpt_every": 1000}
COMMON = [f"--config.{field}={value}" for field, value in SETTINGS.items()]
# tests/configs/tiny.py's arguments: the method, and the evaluations kept.
CLIP, DECLIP = "clip_vitb32,shapes,shapes_retrieval", "declip_vitb32,shapes"
# Synced SimSiam BatchNorm, and a queue the run fills, so that NNS reads real neighbours.
DECLIP_FLAGS = ("--config.declip.sync_bn=True", "--config.declip.queue_size=64")


def _config(arg: str):
    config = tiny_configs.get_config(arg)
    config.update(SETTINGS)
    return config


def _env() -> dict:
    """The launcher's environment: none of this session's XLA flags (local.sh adds its
    devices); the session's compilation cache, so that a rerun reuses what the first run
    compiled; this interpreter first on the PATH, as an activated virtualenv puts it."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python`
    return env


def _start(arg: str, workdir, tmp_path, *overrides: str) -> subprocess.Popen:
    """`launch/local.sh 2` (4 CPU devices per process)."""
    command = [str(ROOT / "launch" / "local.sh"), "2", f"--config=tests/configs/tiny.py:{arg}"]
    env = {**_env(), "LOGDIR": str(tmp_path / "logs")}
    return subprocess.Popen(
        [*command, f"--workdir={workdir}", *COMMON, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, tmp_path) -> tuple[int, str]:
    """The launcher's status and every process's output (process 0's is on the terminal)."""
    output, _ = process.communicate(timeout=600)
    logs = sorted(
        set((tmp_path / "logs").glob("process_*.log")) - {tmp_path / "logs/process_0.log"}
    )
    return process.returncode, output + "".join(log.read_text() for log in logs)


def _metrics(workdir) -> dict:
    """Name -> {step: value}; a step logged twice keeps its latest value."""
    rows = read_metrics(workdir / "metrics.jsonl")[0]
    return {name: dict(values) for name, values in series(rows).items()}


def _assert_same_run(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert abs(got["train/loss"][step] - want["train/loss"][step]) <= 1e-6, step
    evals = {name for name in want if name.startswith("eval/")}
    assert evals and {name for name in got if name.startswith("eval/")} == evals
    for name in evals:
        assert got[name] == want[name], name


# `train.run` of a test config on 1 process × 8 devices (`stop_at`: 0 for none).
_ONE_PROCESS = """
import sys
from clipjax import train
from tests import test_multiprocess as t
arg, workdir, stop_at = sys.argv[1:]
config = t._declip_config() if arg == "declip" else t._config(t.CLIP)
train.run(config, workdir, stop_at=int(stop_at) or None)
"""


def _one_process(arg: str, workdir, stop_at: int = 0) -> None:
    """`_ONE_PROCESS` in a subprocess, at XLA's default optimisation (see the docstring)."""
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    command = [sys.executable, "-c", _ONE_PROCESS, arg, str(workdir), str(stop_at)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1 × 8 references: CLIP straight and stopped at step 2 (its checkpoint is resumed by 2
    processes), and DeCLIP with synced BatchNorm, straight."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("clip", "clip_stopped", "declip")}
    _one_process("clip", out["clip"])
    _one_process("clip", out["clip_stopped"], stop_at=2)
    _one_process("declip", out["declip"])
    return out


def _declip_config():
    config = _config(DECLIP)
    config.declip.sync_bn, config.declip.queue_size = True, 64  # DECLIP_FLAGS
    return config


def test_a_one_process_checkpoint_resumes_on_two_processes_on_the_same_batches(
    one_process, tmp_path
):
    """Steps 3–6 on 2 × 4 after a 1 × 8 checkpoint of step 2 equal the 1 × 8 run's, and so do
    the evaluations, which each process embeds its share of."""
    workdir = one_process["clip_stopped"]
    status, output = _finish(_start(CLIP, workdir, tmp_path), tmp_path)
    assert status == 0, output
    moved = "Checkpoint 2 was saved by 1 process(es), this run has 2: the input continues from"
    assert f"{moved} global batch 2." in output
    _assert_clean(output)
    _assert_same_run(_metrics(workdir), _metrics(one_process["clip"]), range(1, STEPS + 1))


def test_declip_on_two_processes_survives_sigterm_and_equals_one_process(one_process, tmp_path):
    """A SIGTERM to process 1 alone stops both processes at the same step with a checkpoint
    (exit 143 each); resumed on 1 process × 8 devices, the run goes on, and every step's loss
    equals the 1 × 8 run's."""
    workdir = tmp_path / "declip"
    launcher = _start(DECLIP, workdir, tmp_path, *DECLIP_FLAGS)
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").exists() or not _metrics_rows(workdir):
        assert launcher.poll() is None and time.monotonic() < deadline, _finish(launcher, tmp_path)
        time.sleep(0.1)
    os.kill(_process(launcher.pid, 1), signal.SIGTERM)
    status, output = _finish(launcher, tmp_path)
    assert status == 128 + signal.SIGTERM, output
    assert output.count("clipjax: SIGTERM received: stopped at step") == 2, output
    steps = {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    stopped_at = max(steps)
    assert stopped_at < STEPS
    # Resumed on one process: the 2-process input position moves to it.
    _one_process("declip", workdir)
    got, want = _metrics(workdir), _metrics(one_process["declip"])
    _assert_same_run(got, want, range(1, STEPS + 1))
    # NNS reads the queue: the queue came back exactly, and filled alike on 2 processes.
    for step in range(1, STEPS + 1):
        assert abs(got["train/loss_nns"][step] - want["train/loss_nns"][step]) <= 1e-6, step


def _metrics_rows(workdir) -> list:
    try:
        return read_metrics(workdir / "metrics.jsonl")[0]
    except Exception:  # noqa: BLE001 - not written yet
        return []


def _process(launcher_pid: int, index: int) -> int:
    """The pid of the launcher's clipjax process `index`."""
    for child in psutil.Process(launcher_pid).children():
        if f"--process_id={index}" in child.cmdline():
            return child.pid
    raise AssertionError(f"no process {index} under the launcher")


def _assert_clean(output: str) -> None:
    """No traceback and no fatal error of the JAX distributed runtime in any process."""
    for sign in ("Traceback", "incarnation", "Terminating process", "FATAL", "Check failed"):
        assert sign not in output, output


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
