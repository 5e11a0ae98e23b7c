"""clipjax.tools.soak: a DeCLIP run under random SIGKILL and SIGTERM, restarted each time, ends
bitwise equal to the uninterrupted run, and so does a 2-process run whose processes are lost
one at a time under the restarting launcher; and its comparison sees a difference where there
is one."""

import json
import pathlib
import shutil
import subprocess
import sys

from clipjax.tools import soak
from tests import tiny
from tests.test_multiprocess import _env

ROOT = pathlib.Path(__file__).parent.parent


def test_three_random_faults_end_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    output = tmp_path / "soak"
    env = tiny.one_device_env()
    command = [sys.executable, "-m", "clipjax.tools.soak"]
    command += [
        "--config=tests/configs/tiny.py:declip_vitb32",
        "--faults=3",
        "--steps=24",
        "--ckpt_every=3",
        f"--output={output}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["landed"] == 3 and report["equal"]
    assert report["parts"] == [
        "model_state",
        "objective_state",
        "opt_state",
        "params",
        "rng",
        "step",
    ]
    assert not report["arrays_differ"] and not report["rows_differ"] and not report["rows_missing"]
    assert report["rows"] >= 24  # every step, and those logged again after a kill

    # The comparison itself: checkpoint 21 presented as 24, and one loss changed, differ.
    copy = tmp_path / "copy"
    shutil.copytree(output / "reference", copy)
    shutil.rmtree(copy / "checkpoints" / "24")
    (copy / "checkpoints" / "21").rename(copy / "checkpoints" / "24")
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    rows[4]["train/loss"] += 1e-7
    (copy / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = soak.compare(str(output / "reference"), str(copy), 24)
    assert "step" in result["arrays_differ"]
    assert any(path.startswith("params/") for path in result["arrays_differ"])
    assert any(path.startswith("objective_state/") for path in result["arrays_differ"])
    assert result["rows_differ"] == [rows[4]["step"]]


def test_three_host_losses_under_the_restarting_launcher_end_bitwise_equal(tmp_path):
    """`--processes=2`: each fault goes to one process of a `launch/local.sh --max_restarts=3
    2` group (SIGTERM to process 1, then to process 0, then SIGKILL to process 1, with seed
    0); the launcher starts the group again each time, and the final state and every logged
    row equal the uninterrupted 2-process run's, bit for bit."""
    output = tmp_path / "soak"
    env = {**_env(), "XLA_FLAGS": tiny.one_device_env()["XLA_FLAGS"]}  # local.sh adds devices
    command = [sys.executable, "-m", "clipjax.tools.soak", "--processes=2"]
    command += ["--config=tests/configs/tiny.py:clip_vitb32", "--faults=3", "--steps=12"]
    command += ["--ckpt_every=2", f"--output={output}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["landed"] == 3 and report["equal"], report
    assert [(f["signal"], f["process"]) for f in report["faults"]] == [
        ("SIGTERM", 1),
        ("SIGTERM", 0),
        ("SIGKILL", 1),
    ]
    assert report["parts"] == ["opt_state", "params", "rng", "step"]
    assert not report["arrays_differ"] and not report["rows_differ"] and not report["rows_missing"]
    # One line of the launcher for each fault, and the restarts it made.
    restarts = [line for line in report["launcher"] if "; restart " in line]
    assert [line.rsplit("; ", 1)[1] for line in restarts] == [
        f"restart {i} of 3." for i in (1, 2, 3)
    ]
    assert "launch: process 1 was lost (killed by SIGKILL)" in restarts[2]
