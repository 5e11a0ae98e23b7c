"""The trainer on 8 fake devices: exact resume, the optimizer's masks, incompatible checkpoints."""

import os
import shutil

import pytest

from clipjax import train
from clipjax.config import ConfigError, eval_settings, load_saved
from clipjax.evaluate import checkpoint_eval
from clipjax.metrics import read_metrics
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
    assert {"train/loss", "train/logit_scale", "train/lr", "train/samples_per_s"} <= set(rows[0])
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
    step, results = checkpoint_eval.evaluate(load_saved(str(copy)), str(copy))
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


def test_declip_resume_continues_with_the_same_queue(tmp_path):
    """DeCLIP's NNS term reads the queue, so equal per-step NNS losses after a resume mean the
    queue (and everything else) came back exactly."""
    config = tiny.tiny_config("declip_vitb32")
    config.total_steps, config.log_every, config.ckpt_every = 4, 1, 2
    config.eval_every = 1_000
    config.declip.queue_size = 64  # filled within the run, so the neighbours are real texts
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.run(config, straight)
    train.run(config, resumed, stop_at=2)
    train.run(config, resumed)

    def nns(workdir):
        rows = _rows(workdir)
        return {
            r["step"]: (r["train/loss"], r["train/loss_nns"]) for r in rows if "train/loss" in r
        }

    assert nns(resumed) == nns(straight)
    assert sorted(nns(straight)) == [1, 2, 3, 4]


def test_incompatible_checkpoint_is_refused(runs):
    straight, _, _ = runs
    config = tiny_config()
    config.model.embed_dim = 24
    with pytest.raises(ConfigError, match=r"incompatible model: params/.* Use a new --workdir"):
        train.run(config, straight)
