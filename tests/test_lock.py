"""One run per workdir: the lock refuses a live holder and takes over a dead one's."""

import json
import os
import socket
import subprocess
import sys

import pytest

from clipjax.errors import ConfigError
from clipjax.lock import workdir_lock


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_is_refused_and_the_lock_released(tmp_path):
    workdir = str(tmp_path)
    with workdir_lock(workdir):
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as e, workdir_lock(workdir):
            pass
        message = str(e.value)
        assert message.startswith(
            f"--workdir={workdir} is in use by pid {os.getpid()} on {socket.gethostname()} (since "
        )
        assert message.endswith(
            "); wait for that run to end or use another --workdir. If it is gone (e.g. its host "
            f"was preempted), delete {tmp_path / 'lock'}."
        )
    assert not (tmp_path / "lock").exists()


def test_a_stale_lock_is_taken_over_and_logged(tmp_path, caplog):
    lock = tmp_path / "lock"
    dead = _dead_pid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": 0.0}))
    with caplog.at_level("WARNING"), workdir_lock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"Taking over the stale lock {lock} (pid {dead}, not running)." in caplog.text
    lock.write_text("{half a lock")  # a crash while writing it
    with workdir_lock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"host": "tpu-worker-7", "pid": 1, "since": 0.0}))
    refused = pytest.raises(ConfigError, match="in use by pid 1 on tpu-worker-7")
    with refused, workdir_lock(str(tmp_path)):
        pass
    assert (tmp_path / "lock").exists()  # someone else's: left alone
