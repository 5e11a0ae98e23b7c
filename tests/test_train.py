"""The trainer on 8 fake devices: exact resume, the optimizer's masks, incompatible checkpoints."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from clipjax import checkpoint, sharding, train
from clipjax import config as config_lib
from clipjax.config import ConfigError, eval_settings, load_saved
from clipjax.errors import Interrupted, TrainingError
from clipjax.evaluate import checkpoint_eval
from clipjax.metrics import MetricsWriter, read_metrics
from tests import tiny


def _rows(workdir) -> list[dict]:
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]


def tiny_config():
    """Six steps, each logged, checkpoints at 3 and 6, one evaluation at the end."""
    c = tiny.tiny_config()
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 1_000
    c.ckpt_every = 3
    return c


def _losses(workdir):
    return {row["step"]: row["train/loss"] for row in _rows(workdir) if "train/loss" in row}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one stopped at step 3 then resumed in a fresh `run` call."""
    config = tiny_config()
    straight = str(tmp_path_factory.mktemp("straight"))
    train.run(config, straight)
    resumed = str(tmp_path_factory.mktemp("resumed"))
    train.run(config, resumed, stop_at=3)
    stopped_losses = _losses(resumed)
    train.run(config, resumed)
    return straight, resumed, stopped_losses


def test_resume_reproduces_every_step_loss(runs):
    straight, resumed, stopped_losses = runs
    assert sorted(stopped_losses) == [1, 2, 3]
    want, got = _losses(straight), _losses(resumed)
    assert sorted(want) == list(range(1, 7))
    assert got == want  # exactly, not approximately
    assert len(set(want.values())) == 6


def test_workdir_contents(runs):
    straight, _, _ = runs
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["3", "6"]
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "tensorboard"} <= set(
        os.listdir(straight)
    )
    rows = _rows(straight)
    assert {"train/loss", "train/logit_scale", "train/lr", "train/nonfinite_steps"} <= set(rows[0])
    # The first step includes compiling: its rate is not measured, the next ones are.
    assert "train/samples_per_s" not in rows[0] and rows[1]["train/samples_per_s"] > 0
    assert all(row["data/skipped"] == 0 for row in rows if "train/loss" in row)
    evals = [row for row in rows if "eval/shapes/zeroshot_top1" in row]
    assert [row["step"] for row in evals] == [6]
    metrics = [f"eval/shapes/zeroshot_top{k}" for k in (1, 5)]
    metrics += [f"eval/shapes_retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    metrics += [f"eval/shapes_probe/probe_top{k}" for k in (1, 5)]
    for metric in metrics:
        assert 0.0 <= evals[0][metric] <= 1.0
    assert (
        evals[0]["eval/shapes_probe/probe_l2"] in eval_settings(tiny_config().evals.shapes_probe).l2
    )


def test_standalone_evaluation_reproduces_the_training_evaluation(runs, tmp_path):
    """`python -m clipjax.evaluate` on the final checkpoint, with the workdir's saved config,
    gives exactly the numbers the trainer logged at that step, and appends them."""
    straight, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    step, results, _ = checkpoint_eval.evaluate(load_saved(str(copy)), str(copy))
    logged = [row for row in _rows(straight) if "eval/shapes/zeroshot_top1" in row][-1]
    assert step == 6
    assert results == {k: v for k, v in logged.items() if k.startswith("eval/")}
    assert _rows(str(copy))[-1] == {"step": 6, **results}

    with pytest.raises(ConfigError) as e:
        checkpoint_eval.evaluate(load_saved(str(copy)), str(copy), step=4)
    assert str(e.value) == f"{copy}/checkpoints has no checkpoint of step 4; it has steps 3, 6."


def test_loss_decreases(runs):
    straight, _, _ = runs
    losses = _losses(straight)
    assert losses[6] < losses[1]


def test_incompatible_checkpoint_is_refused(runs, tmp_path):
    """A changed field that fixes the state is refused in one line from the saved config; with
    no config.json beside the checkpoints, the checkpoint's own shapes still refuse it."""
    straight, _, _ = runs
    config = tiny_config()
    config.model.embed_dim = 24
    config.seed = 3
    with pytest.raises(ConfigError) as e:
        train.run(config, straight)
    assert str(e.value) == (
        f"{straight} holds checkpoints of a run with other values of fields that fix its state "
        "or input order: model.embed_dim 16 → 24; seed 0 → 3. Resume with the saved values "
        "(config.json there), use a new --workdir, or start afresh from its weights with a new "
        f"--workdir and --config.init_from={straight}."
    )
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    os.remove(copy / "config.json")
    with pytest.raises(ConfigError, match=r"incompatible model: params/.* Use a new --workdir"):
        train.run(config, str(copy))


def test_resume_changes_sort_fields_into_steering_warned_and_refused():
    saved = {
        "batch_size": 128,
        "total_steps": 600,
        "optim": {"lr": 5e-4, "b1": 0.9},
        "evals": {"a": {"source": "shapes"}},
        "data": {"train": "csv:x", "num_workers": 1},
    }
    new = {
        "batch_size": 64,
        "total_steps": 900,
        "optim": {"lr": 1e-3, "b1": 0.9},
        "evals": {"b": {"source": "shapes"}},
        "data": {"train": "csv:y", "num_workers": 4},
    }
    assert config_lib.resume_changes(saved, new) == {
        "steering": [
            "data.num_workers 1 → 4",
            "evals.a.source 'shapes' → 'absent'",
            "evals.b.source 'absent' → 'shapes'",
            "total_steps 600 → 900",
        ],
        "warned": ["optim.lr 0.0005 → 0.001"],
        "refused": ["batch_size 128 → 64", "data.train 'csv:x' → 'csv:y'"],
    }


def test_a_resume_that_changes_only_how_the_run_is_steered_continues_exactly(runs, tmp_path):
    straight, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "checkpoints" / "6")  # resume from step 3
    config = tiny_config()
    config.log_every, config.ckpt_every, config.keep_ckpts = 2, 2, 5
    train.run(config, str(copy))
    resumed = {step: loss for step, loss in _losses(str(copy)).items() if step > 3}
    assert resumed == {step: _losses(straight)[step] for step in resumed}
    assert 4 in resumed and 6 in resumed
    assert _checkpoint_steps(str(copy)) == [3, 4, 6]


def test_a_resume_over_changed_training_data_is_refused_unless_allowed(tmp_path):
    """The checkpoint's input position was saved over a 64-row CSV; cut to 32 rows, the same
    spec is refused in one line, and resumes with `data.allow_changed`."""
    names = [f"{i}.png" for i in range(64)]
    for seed, name in enumerate(names):
        pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)

    def write(count: int) -> None:
        lines = [f"{name},a picture number {i}" for i, name in enumerate(names[:count])]
        (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(lines) + "\n")

    write(64)
    config = tiny_config()
    config.data.train = f"csv:{tmp_path}/pairs.csv"
    config.evals = {}
    workdir = str(tmp_path / "run")
    train.run(config, workdir, stop_at=3)
    write(32)
    with pytest.raises(ConfigError) as e:
        train.run(config, workdir)
    assert str(e.value) == (
        f"the training data (config.data.train) changed since checkpoint {workdir}/checkpoints/"
        "3: it holds 32 records, 64 when it was saved, so the saved input position points into "
        "other data. Restore the data, train in a new --workdir (--config.init_from=WORKDIR "
        "starts from its weights), or resume anyway with --config.data.allow_changed=True."
    )
    assert _checkpoint_steps(workdir) == [3]
    config.data.allow_changed = True
    train.run(config, workdir)
    assert _checkpoint_steps(workdir) == [3, 6]


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs, a disk that fills (mounting needs root, as on the CI machine)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _train_command(workdir, *, free_space_known: bool = True) -> subprocess.CompletedProcess:
    """`python -m clipjax.main` with `tiny_config()`'s settings; with `free_space_known=False`,
    as on an object store, no free-space check precedes a save and Orbax meets the full disk."""
    flags = [f"--workdir={workdir}", "--config=tests/configs/tiny.py:clip_vitb32"]
    flags += [f"--config.{k}={v}" for k, v in (("total_steps", 6), ("log_every", 1))]
    flags += ["--config.eval_every=1000", "--config.ckpt_every=3"]
    unknown = "" if free_space_known else "paths.free_bytes = lambda location: None; "
    code = (
        f"from clipjax import paths; {unknown}from clipjax import main; from absl import app; "
        "app.run(main.main, flags_parser=main.parse_flags)"
    )
    root = os.path.dirname(os.path.dirname(__file__))
    # The session's compilation cache: the tests' own programs, compiled once.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    command = [sys.executable, "-c", code, *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root, env=env)


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes(
    runs, small_disk, caplog
):
    """Checkpoint 3 is saved; then the disk has room for half a checkpoint. The save at step 6
    is refused before it starts; without a free-space reading (an object store), Orbax's write
    fails on the full disk. Each time: one line, exit 1, no traceback, no temporary folder, and
    checkpoint 3 intact. With space freed, the same command ends on the uninterrupted run's
    losses."""
    straight, _, _ = runs
    workdir = str(small_disk / "run")
    config = tiny_config()
    config.keep_ckpts = 5  # 6 checkpoints do not fit in 32 MB: the first save warns
    train.run(config, workdir, stop_at=3)
    assert "fewer than config.keep_ckpts + 1 = 6 fit" in caplog.text
    size = sum(f.stat().st_size for f in (small_disk / "run/checkpoints/3").rglob("*"))
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - size // 2)
    message = (
        rf"clipjax: could not save checkpoint {workdir}/checkpoints/6 \((.*)\): it needs about "
        r"[\d.,]+ MB( and [\d.,]+ MB are free there)?\. Free space, lower config.keep_ckpts "
        rf"\(now 3\) or use another --workdir; the last good checkpoint, {workdir}/checkpoints/"
        "3, is intact: run the same command to resume from it."
    )
    for known, reason in ((True, "the disk is too full to hold it"), (False, "the disk is full")):
        done = _train_command(workdir, free_space_known=known)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        last = re.fullmatch(message, done.stderr.strip().splitlines()[-1])
        assert last and last[1] == reason and bool(last[2]) == known, done.stderr[-500:]
        assert os.listdir(small_disk / "run/checkpoints") == ["3"]
    os.remove(filler)
    assert _train_command(workdir).returncode == 0
    assert _checkpoint_steps(workdir) == [3, 6]
    assert all(
        row["train/loss"] == _losses(straight)[row["step"]]
        for row in _rows(workdir)
        if "train/loss" in row
    )


def _checkpoint_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))


def test_sigterm_saves_the_step_reached_and_resume_is_exact(runs, tmp_path, monkeypatch):
    """SIGTERM while step k runs: step k+1, the next one dispatched, carries the stop; the host
    reads it once step k+2 is dispatched, so k+2 is checkpointed and Interrupted says so (one
    step later than a host that waited for every step); a rerun continues on exactly the
    uninterrupted run's losses."""
    straight, _, _ = runs
    config = tiny_config()
    config.ckpt_every = 100  # only the signal's checkpoint (and the last step's)
    workdir = str(tmp_path / "run")

    class TerminatedAfterRow2(MetricsWriter):
        def write(self, step, scalars):
            super().write(step, scalars)
            if step == 2:  # written once step 3 is dispatched
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "MetricsWriter", TerminatedAfterRow2)
    with pytest.raises(Interrupted) as e:
        train.run(config, workdir)
    assert e.value.step == 5 and e.value.signum == signal.SIGTERM
    assert str(e.value) == (
        f"SIGTERM received: stopped at step 5 and saved {workdir}/checkpoints/5; run "
        "the same command again to resume."
    )
    assert _checkpoint_steps(workdir) == [5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.undo()
    train.run(config, workdir)
    assert _losses(workdir) == _losses(straight)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    config = tiny_config()
    # Every update's norm overflows float32: each step is skipped, none changes the state.
    config.optim.warmup_steps, config.optim.lr, config.optim.grad_clip = 0, 1e30, 0.0
    config.max_nonfinite_steps, config.ckpt_every = 3, 1
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingError) as e:
        train.run(config, workdir)
    rows = [r for r in _rows(workdir) if "train/loss" in r]
    assert [(r["step"], r["train/nonfinite_steps"]) for r in rows] == [(1, 1), (2, 1), (3, 1)]
    assert str(e.value) == (
        "stopped at step 3: 3 steps in a row had a non-finite loss, gradient or update "
        "(config.max_nonfinite_steps=3), and none of them was applied. The last good "
        f"checkpoint is {workdir}/checkpoints/2; lower config.optim.lr (or raise "
        "config.optim.warmup_steps) and run again to resume from it."
    )
    # Every checkpoint holds finite values only, and the skipped steps changed no parameter.
    config = load_saved(workdir)
    states = {}
    for step in _checkpoint_steps(workdir):
        with _restored(config, workdir, step) as state:
            leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
            assert int(state.step) == step
        assert all(np.isfinite(x).all() for x in leaves)
        states[step] = leaves
    assert sorted(states) == [1, 2]
    for a, b in zip(states[1], states[2], strict=True):
        np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def _restored(config, workdir, step):
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        _, _, abstract_state, _ = train.build(config, mesh)
        ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
        try:
            yield ckpt.restore_state(abstract_state, step)
        finally:
            ckpt.close()


@pytest.mark.parametrize(
    "damage", ["truncate a state data file", "delete state/_METADATA", "delete the input position"]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, damage):
    straight, _, _ = runs
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight, workdir)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    latest = os.path.join(workdir, "checkpoints", "6")
    if damage.startswith("truncate"):
        files = [
            os.path.join(root, name)
            for root, _, names in os.walk(os.path.join(latest, "state"))
            for name in names
            if os.path.basename(root) == "d"
        ]
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif damage.endswith("_METADATA"):
        os.remove(os.path.join(latest, "state", "_METADATA"))
    else:
        shutil.rmtree(os.path.join(latest, "data"))
    if "input" not in damage:
        with pytest.raises(ConfigError) as e:
            checkpoint_eval.evaluate(load_saved(workdir), workdir, 6)
        assert str(e.value).startswith(f"checkpoint {workdir}/checkpoints/6 does not restore (")
        assert str(e.value).endswith("; pass --step= one of 3.")
    else:  # evaluating needs no input position
        assert checkpoint_eval.evaluate(load_saved(workdir), workdir, 6)[0] == 6
        os.remove(os.path.join(workdir, "metrics.jsonl"))
    train.run(tiny_config(), workdir)  # resumes from step 3 and redoes 4-6
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("6-")
    assert _losses(workdir) == {s: v for s, v in _losses(straight).items() if s > 3}


def test_evaluate_command_line_errors_are_one_line(runs):
    straight, _, _ = runs
    for args, message in [
        (["--step=abc"], "flag --step=abc: invalid literal for int() with base 10: 'abc'"),
        (["--step=4"], f"{straight}/checkpoints has no checkpoint of step 4; it has steps 3, 6."),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "clipjax.evaluate", f"--workdir={straight}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"clipjax.evaluate: {message}"


def test_ckpt_every_secs_saves_on_time(tmp_path):
    config = tiny_config()
    config.ckpt_every, config.keep_ckpts = 100, 10
    config.ckpt_every_secs = 1e-9  # every step is past due
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    # Step t's request is read once step t+1 is dispatched, and saved there; step t+1's own
    # request was made before that save, which served it. The last step is always saved.
    assert _checkpoint_steps(workdir) == [2, 4, 6]


def test_the_host_reads_only_the_previous_steps_flags_and_logged_rows(tmp_path, monkeypatch):
    """In the steady state, after dispatching step t the host fetches only step t-1's flags,
    and the other metrics only of logged steps; it waits for a step itself only where it
    evaluates or saves (here the last step)."""
    config = tiny_config()
    config.total_steps, config.log_every, config.ckpt_every = 8, 4, 100
    dispatched, owner, fetched = [], {}, []
    real_build, real_get = train.build, jax.device_get

    def build(config, mesh):
        objective, init, abstract_state, step_fn = real_build(config, mesh)

        def recorded(state, batch):
            state, metrics = step_fn(state, batch)
            dispatched.append(len(dispatched) + 1)
            # The arrays are kept, so that no other array takes their ids.
            owner.update({id(v): (dispatched[-1], key, v) for key, v in metrics.items()})
            return state, metrics

        return objective, init, abstract_state, recorded

    def device_get(tree):
        for leaf in jax.tree.leaves(tree):
            if id(leaf) in owner:
                fetched.append((dispatched[-1], *owner[id(leaf)][:2]))
        return real_get(tree)

    monkeypatch.setattr(train, "build", build)
    monkeypatch.setattr(jax, "device_get", device_get)
    train.run(config, str(tmp_path / "run"))
    flags = {"train/nonfinite", "data/skipped", "control/stop", "control/save"}
    keys = {step: {key for _, s, key in fetched if s == step} for step in range(1, 9)}
    for step in range(1, 9):
        logged = step in (4, 8)
        assert (keys[step] > flags) if logged else (keys[step] == flags), step
    for latest, step, _ in fetched:
        assert latest == (8 if step == 8 else step + 1), (latest, step)
