"""clipjax.tools.soak: a DeCLIP run under random SIGKILL and SIGTERM, restarted each time, ends
bitwise equal to the uninterrupted run; and its comparison sees a difference where there is
one."""

import json
import pathlib
import shutil
import subprocess
import sys

from clipjax.tools import soak
from tests import tiny

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
