"""A process lost mid-run, as a host is lost: `kill -9` of process 1, then of process 0 (the
coordinator) in the group the launcher started again, in one `launch/local.sh
--max_restarts=1 2` run of 4 CPU devices per process. Each time the launcher stops the
survivor at once and says in one line which process was lost, after which step, and the last
good checkpoint; no native dump or traceback reaches the terminal; every checkpoint left
restores, and no save is left half-written."""

import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from clipjax.tools import soak
from tests import tiny
from tests.test_multiprocess import ROOT, _env

# A run long enough to be killed in twice: a checkpoint every 2 steps, every step logged.
FLAGS = [
    "--config=tests/configs/tiny.py:clip_vitb32",
    "--config.evals={}",
    "--config.total_steps=60",
    "--config.ckpt_every=2",
    "--config.log_every=1",
]
BOUND = 60  # seconds from a kill to the survivor's end (the bound)


def _group(launcher: subprocess.Popen, deadline: float) -> list[psutil.Process]:
    """The launcher's 2 clipjax processes of its current start, by index, once both run."""
    while True:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        ids = {p: re.search(r"--process_id=(\d)", _command(p)) for p in _children(launcher)}
        if len([p for p in ids if ids[p]]) == 2:
            return sorted((p for p in ids if ids[p]), key=lambda p: ids[p][1])
        time.sleep(0.05)


def _children(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(launcher.pid).children()
    except psutil.NoSuchProcess:
        return []


def _command(process: psutil.Process) -> str:
    """A process's command line; empty for one that has ended (a zombie, or gone) meanwhile."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return ""


def _last_step(workdir) -> int:
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def _checkpoints(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _kill(victim: psutil.Process, survivor: psutil.Process, workdir) -> tuple[float, str]:
    """kill -9 `victim`; (seconds until `survivor` is gone, where the run stood then)."""
    killed = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    survivor.wait(BOUND)
    seconds = time.monotonic() - killed
    stood = f"after step {_last_step(workdir)}; the last good checkpoint is "
    return seconds, stood + f"{workdir}/checkpoints/{_checkpoints(workdir)[-1]}"


def test_a_killed_process_stops_the_group_in_one_line_and_it_restarts(tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    command = [str(ROOT / "launch" / "local.sh"), "--max_restarts=1", "2"]
    launcher = subprocess.Popen(
        [*command, f"--workdir={workdir}", *FLAGS],
        cwd=ROOT,
        # Unoptimised code, as the rest of the suite (`conftest.py`): it compiles sooner.
        env={**_env(), "LOGDIR": str(logs), "XLA_FLAGS": tiny.one_device_env()["XLA_FLAGS"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    first = _group(launcher, deadline)
    while not (workdir / "checkpoints" / "4").is_dir():  # two checkpoints, then step 5
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    seconds_1, stood_1 = _kill(first[1], first[0], workdir)

    second = _group(launcher, deadline)  # started again, it resumes and saves once more
    while _checkpoints(workdir)[-1] <= int(stood_1.rsplit("/", 1)[1]):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    seconds_0, stood_0 = _kill(second[0], second[1], workdir)
    output, _ = launcher.communicate(timeout=BOUND)

    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert seconds_1 < BOUND and seconds_0 < BOUND
    lost = "launch: process {} was lost (killed by SIGKILL) {}; stopped the other 1 process"
    assert f"{lost.format(1, stood_1)}; restart 1 of 1.\n" in output, output
    assert f"{lost.format(0, stood_0)}, 1 restarts spent; the same command resumes.\n" in output
    for sign in ("Fatal Python error", "Traceback", "Check failure", "terminate called"):
        assert sign not in output, output
    # No save left half-written, and each checkpoint left restores, whole.
    assert all(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    for step in _checkpoints(workdir):
        assert int(soak.restore_state(str(workdir), step)["step"]) == step
    # The coordinator listened on the loopback address only.
    assert "Starting JAX distributed service on 127.0.0.1:" in (logs / "process_0.log").read_text()


def test_the_distributed_arguments_carry_the_bind_address_and_the_bounds():
    """main's flags reach `jax.distributed.initialize`: where process 0 listens, the heartbeat
    and shutdown bounds (also when the cluster is detected); bad values in one line."""
    from clipjax import distributed
    from clipjax.errors import ConfigError

    bounds = {"heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 60}
    assert distributed.distributed_arguments(None, None, None) == bounds
    assert distributed.distributed_arguments("127.0.0.1:9", 2, 1, "127.0.0.1:9", 5, 7) == {
        "heartbeat_timeout_seconds": 5,
        "shutdown_timeout_seconds": 7,
        "coordinator_bind_address": "127.0.0.1:9",
        "coordinator_address": "127.0.0.1:9",
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(ConfigError, match=r"^--coordinator_bind='lo' must be HOST:PORT, e\.g\."):
        distributed.distributed_arguments(None, None, None, "lo")
    with pytest.raises(
        ConfigError, match=r"^--heartbeat_timeout=0 must be at least 1 \(seconds\)\.$"
    ):
        distributed.distributed_arguments(None, None, None, heartbeat_timeout=0)
