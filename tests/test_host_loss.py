"""A process lost mid-run, as a host is lost: `kill -9` of process 1, and of process 0 (the
coordinator), in a `launch/local.sh 2` run of 4 CPU devices each. The launcher stops the
survivor at once and says in one line which process was lost, after which step, and the last
good checkpoint; no native dump or traceback reaches the terminal; every checkpoint left
restores, and no save is left half-written."""

import json
import os
import signal
import subprocess
import time

import pytest

from clipjax.tools import soak
from tests.test_multiprocess import ROOT, _env, _process

# A run long enough to be killed in: a checkpoint every 2 steps, every step logged.
FLAGS = [
    "--config=tests/configs/tiny.py:clip_vitb32",
    "--config.evals={}",
    "--config.total_steps=60",
    "--config.ckpt_every=2",
    "--config.log_every=1",
]
BOUND = 60  # seconds from the kill to the launcher's exit (the bound)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_killed_stops_the_run_in_one_line(victim, tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    launcher = subprocess.Popen(
        [str(ROOT / "launch" / "local.sh"), "2", f"--workdir={workdir}", *FLAGS],
        cwd=ROOT,
        env={**_env(), "LOGDIR": str(logs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "4").is_dir():  # two checkpoints, then step 5
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(_process(launcher.pid, victim), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=BOUND)
    seconds = time.monotonic() - killed

    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert seconds < BOUND
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    logged = json.loads(rows[-1])["step"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())  # no tmp folder
    assert steps[-1] >= 4
    assert (
        f"launch: process {victim} was lost (killed by SIGKILL) after step {logged}; the last "
        f"good checkpoint is {workdir}/checkpoints/{steps[-1]}; stopped the other 1 process; "
        "the same command resumes.\n"
    ) in output
    for sign in ("Fatal Python error", "Traceback", "Check failure", "terminate called"):
        assert sign not in output, output
    for step in steps:  # each checkpoint left restores, whole
        assert int(soak.restore_state(str(workdir), step)["step"]) == step
    # The coordinator listened on the loopback address only.
    assert "Starting JAX distributed service on 127.0.0.1:" in (logs / "process_0.log").read_text()
