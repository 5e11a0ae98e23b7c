"""The launchers: the sweep expander (one command per grid point, overrides and workdirs named
after them), and the TPU pod, SLURM and local multi-process launchers."""

import importlib
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

_spec = importlib.util.spec_from_file_location(
    "sweep", pathlib.Path(__file__).parent.parent / "launch" / "sweep.py"
)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_expands_to_every_combination():
    cmds = sweep.commands("configs/c.py:local", "/w", ["optim.lr=1e-3,2e-3", "seed=0,1,2"])
    assert len(cmds) == 6
    assert cmds[0] == (
        "python -m clipjax.main --config=configs/c.py:local --workdir=/w/lr1e-3_seed0 "
        "--config.optim.lr=1e-3 --config.seed=0"
    )
    assert len({c.split("--workdir=")[1].split()[0] for c in cmds}) == 6


def test_no_axes_gives_the_base_run():
    assert sweep.commands("configs/c.py", "/w", []) == [
        "python -m clipjax.main --config=configs/c.py --workdir=/w/base"
    ]


# ---- The cluster launchers, run with their cluster command faked: the command they build,
# and its flags as clipjax.main parses them.

ROOT = pathlib.Path(__file__).parent.parent


def _run_with_fake(tmp_path, fake: str, argv: list[str]) -> list[str]:
    """Run a launcher with `fake` (gcloud, srun) on PATH recording its arguments; returns
    them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "args"
    (bin_dir / fake).write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {record}\n')
    (bin_dir / fake).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT)}
    # Elsewhere than the repository, as sbatch runs a copy of its script.
    subprocess.run(["bash", str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env, check=True)
    return record.read_text().split("\0")[:-1]


def _parsed(main_args: list[str]) -> dict:
    """`python -m clipjax.main ARGS`'s flags as clipjax parses them, without training."""
    script = (
        "import json, sys\n"
        "from clipjax import main\n"
        "main.parse_flags(['clipjax.main', *sys.argv[1:]])\n"
        "f = main.FLAGS\n"
        "print(json.dumps({'distributed': f.distributed, 'workdir': f.workdir,\n"
        "    'batch_size': f.config.batch_size, 'lr': f.config.optim.lr,\n"
        "    'num_workers': f.config.data.num_workers, 'objective': f.config.objective}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *main_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_tpu_pod_launcher_runs_clipjax_on_every_worker(tmp_path):
    args = _run_with_fake(
        tmp_path,
        "gcloud",
        [
            "launch/tpu_pod.sh",
            "my-tpu",
            "us-central2-b",
            "configs/declip_vitb32.py",
            "gs://bucket/runs/declip",
            "--config.batch_size=4096",
            "--config.data.train=csv:/data/my captions.csv",
        ],
    )
    command = args.pop()
    assert args == [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-tpu",
        "--zone=us-central2-b",
        "--worker=all",
    ]
    assert command.startswith("--command=")
    words = shlex.split(command.removeprefix("--command="))
    assert words[:7] == ["cd", "~/clipjax", "&&", "python", "-m", "clipjax.main", "--distributed"]
    assert words[-1] == "--config.data.train=csv:/data/my captions.csv"
    assert _parsed(words[6:-1]) == {
        "distributed": True,
        "workdir": "gs://bucket/runs/declip",
        "batch_size": 4096,
        "lr": importlib.import_module("configs.declip_vitb32").get_config().optim.lr,
        "num_workers": importlib.import_module("configs.declip_vitb32")
        .get_config()
        .data.num_workers,
        "objective": "declip",
    }


def test_slurm_launcher_runs_clipjax_on_every_node(tmp_path):
    args = _run_with_fake(
        tmp_path,
        "srun",
        [
            "launch/slurm_gpu.sbatch",
            "configs/clip_vitb32.py",
            "/shared/runs/clip",
            "--config.optim.lr=1e-4",
        ],
    )
    assert args[:5] == ["--kill-on-bad-exit=1", "python", "-m", "clipjax.main", "--distributed"]
    assert _parsed(args[4:]) == {
        "distributed": True,
        "workdir": "/shared/runs/clip",
        "batch_size": importlib.import_module("configs.clip_vitb32").get_config().batch_size,
        "lr": 1e-4,
        "num_workers": 16,
        "objective": "clip",
    }


def test_slurm_launcher_restarts_a_lost_step_and_ends_with_its_status(tmp_path):
    """A job step whose task is killed is run again, with one line each time, until
    --max_restarts is spent; the status is then the step's (128 + 9); one that succeeds ends
    the job with 0. (srun faked: killed by SIGKILL on its first two starts.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/usr/bin/env bash\necho start >> {tmp_path}/starts\n"
        f"(( $(wc -l < {tmp_path}/starts) > 2 )) || kill -KILL $$\n"
    )
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    workdir = tmp_path / "run"

    def sbatch(restarts: int) -> subprocess.CompletedProcess:
        command = ["bash", str(ROOT / "launch/slurm_gpu.sbatch"), f"--max_restarts={restarts}"]
        command += ["configs/clip_vitb32.py", str(workdir)]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    lost = (
        "launch: srun was lost (killed by SIGKILL) before its first logged step; no checkpoint yet"
    )
    done = sbatch(1)
    assert done.returncode == 128 + 9
    assert done.stderr == (
        f"{lost}; restart 1 of 1.\n{lost}, 1 restarts spent; the same command resumes.\n"
    )
    assert sbatch(2).returncode == 0  # its third start: srun succeeds
    assert (tmp_path / "starts").read_text().count("start") == 3
    assert (tmp_path / "clipjax-7-logs" / "process_0.log").read_text().count("==== ") == 3


def test_local_launcher_needs_a_process_count():
    out = subprocess.run(
        ["bash", "launch/local.sh", "--config=configs/clip_vitb32.py:local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr == (
        "usage: launch/local.sh [--max_restarts=K] N ARGS...  (N processes of python -m "
        "clipjax.main ARGS)\n"
    )
