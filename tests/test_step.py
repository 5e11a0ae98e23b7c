"""The jitted step (`clipjax.step`) on 8 fake devices: contrastive gradient accumulation equal
to the whole batch's gradient, and locked towers (LiT) that neither change nor get a backward
pass."""

import functools
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from clipjax import checkpoint, optimizers, sharding, step, train
from clipjax import config as config_lib
from clipjax.errors import ConfigError
from clipjax.metrics import read_metrics
from clipjax.models.two_tower import TwoTower
from tests.tiny import built, tiny_config


def _config(name: str = "clip_vitb32", **fields):
    c = tiny_config(name)
    c.batch_size = 32  # 4 examples a device: micro-batches of 2 and 1
    c.evals = {}
    for field, value in fields.items():
        target, *path = field.split("__")
        node = c
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
    return c


# ---------------------------------------------------------------------------- accumulation


def _loss_and_grads(config, steps: int = 1, **mesh):
    """The loss, metrics and gradients of one step at the initial state, on the synthetic
    batch: the whole batch's (`steps` = 1) or accumulated over `steps` micro-batches."""
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh)
    with built(config) as (objective, state, _, batch):
        args = (state.params, state.model_state, batch, state.objective_state, state.rng)
        if steps == 1:
            grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
        else:
            grad_fn = functools.partial(step.accumulated_grads, objective, steps=steps)
        (loss, (metrics, _, _)), grads = jax.device_get(jax.jit(grad_fn)(*args))
    return loss, metrics, grads


def _largest_difference(a, b) -> float:
    return max(
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["all-gather", "ring"])
@pytest.mark.parametrize("name", ["clip_vitb32", "siglip_vitb16"])
def test_accumulated_loss_and_gradients_equal_the_whole_batchs(name, chunked):
    """At k = 2 and 4 the loss equals the whole batch's within 1e-6, and every gradient within
    three times what float32's order of summation alone moves it by: the whole batch's own
    gradient on a data × fsdp = 4 × 2 mesh against the 8-way data-parallel one (about 5e-6
    here, on gradients up to 3; one such sample of the rounding, so not a tight bound)."""
    config = _config(name)
    config[config.objective].chunked = chunked
    want_loss, want_metrics, want_grads = _loss_and_grads(config)
    other_mesh = _loss_and_grads(config, data=4, fsdp=2)[2]
    tolerance = max(1e-6, 3 * _largest_difference(other_mesh, want_grads))
    assert (
        tolerance < 1e-4 and max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads)) > 0.1
    )
    for steps in (2, 4):
        loss, metrics, grads = _loss_and_grads(config, steps)
        np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-6)
        for key in want_metrics:
            np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
        assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
        assert _largest_difference(grads, want_grads) <= tolerance, steps


def _losses(workdir) -> dict[int, float]:
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_accumulated_training_follows_the_whole_batch_and_resumes_exactly(tmp_path):
    """Five steps at k = 2 give the losses of five whole-batch steps (within 1e-6); an
    accumulated run stopped at 3 and resumed gives its uninterrupted losses exactly."""
    settings = {"total_steps": 5, "log_every": 1, "ckpt_every": 3}
    runs = {}
    for steps in (1, 2):
        config = _config(**settings, accum_steps=steps)
        runs[steps] = str(tmp_path / f"k{steps}")
        train.run(config, runs[steps])
    want = _losses(runs[1])
    assert sorted(want) == [1, 2, 3, 4, 5] and want[5] < want[1]
    got = _losses(runs[2])
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-6)
    resumed = str(tmp_path / "resumed")
    train.run(_config(**settings, accum_steps=2), resumed, stop_at=3)
    train.run(_config(**settings, accum_steps=2), resumed)
    assert _losses(resumed) == _losses(runs[2])


@pytest.mark.parametrize(
    "name, fields, message",
    [
        (
            "declip_vitb32",
            {"batch_size": 32},
            "config.accum_steps=2: declip cannot accumulate its gradient exactly, as its SimSiam "
            "BatchNorm statistics and its feature queue are computed over the whole batch; use "
            "config.accum_steps=1.",
        ),
        (
            "cliplite_r50",
            {"batch_size": 32},
            "config.accum_steps=2: cliplite cannot accumulate its gradient exactly, as its MI "
            "blocks' BatchNorm statistics are the whole batch's, and its negatives are drawn "
            "within it; use config.accum_steps=1.",
        ),
        (
            "clip_vitb32",
            {"model__image__variant": "RN50", "model__image__size": 32, "model__image__width": 8},
            "config.accum_steps=2: clip cannot accumulate its gradient exactly, as the image "
            "tower's BatchNorm statistics would be each micro-batch's; use config.accum_steps=1 "
            "or a ViT image tower.",
        ),
        (
            "slip_vitb32",
            {"batch_size": 32},
            "config.accum_steps=2: slip cannot accumulate its gradient exactly, as its SimCLR "
            "head's BatchNorm statistics are computed over the whole batch; use "
            "config.accum_steps=1.",
        ),
    ],
    ids=["declip", "cliplite", "resnet", "slip"],
)
def test_accumulation_is_refused_where_it_cannot_be_exact(name, fields, message):
    config = _config(name, **fields, accum_steps=2)
    mesh = sharding.make_mesh(config.mesh)
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(sharding.LOGICAL_RULES),
        pytest.raises(ConfigError) as error,
    ):
        step.build(config, mesh)
    assert str(error.value) == message


def test_accumulation_steps_must_divide_each_devices_share(tmp_path):
    config = _config(accum_steps=3)
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config, str(tmp_path), 8)
    assert str(error.value) == (
        "config.accum_steps=3 does not divide the 4 examples each of the 8 data-parallel "
        "devices holds (config.batch_size=32); use a divisor of 4."
    )
    config.accum_steps = 0
    with pytest.raises(ConfigError, match=r"config.accum_steps=0 must be a number, at least 1"):
        config_lib.validate(config, str(tmp_path), 8)


# ---------------------------------------------------------------------------- locked towers


def _tower(tree: dict, prefixes=("image_tower", "image_projection")):
    return {key: value for key, value in tree.items() if key in prefixes}


def _bitwise_equal(a, b) -> bool:
    return all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_a_locked_image_tower_is_bitwise_unchanged_after_training_and_resume(tmp_path):
    config = _config(total_steps=6, log_every=1, ckpt_every=3, **{"model__image__locked": True})
    workdir = str(tmp_path / "run")
    train.run(config, workdir, stop_at=3)
    train.run(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        _, init, abstract_state, _ = step.build(config, mesh)
        start = init(jax.random.PRNGKey(config.seed))
        ckpt = checkpoint.Checkpointer(workdir, keep=3)
        trained = {s: ckpt.restore_state(abstract_state, s) for s in (3, 6)}
        ckpt.close()
    for state in trained.values():
        assert _bitwise_equal(_tower(state.params), _tower(start.params))
        assert not _bitwise_equal(state.params["text_tower"], start.params["text_tower"])
        # No optimizer moments for the locked tower: only the trained parameters have any.
        names = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
        ]
        assert names and not any("image_tower" in n or "image_projection" in n for n in names)
        assert any("text_tower" in name for name in names)


def test_a_locked_tower_has_no_backward_pass():
    """The compiled step's flops fall by at least 1.5 times the image tower's forward flops (its
    backward costs about twice them); the text tower's are kept."""

    def flops(config):
        with built(config) as (objective, state, step_fn, batch):
            step_flops = step_fn.lower(state, batch).compile().cost_analysis()["flops"]
            encode = jax.jit(
                lambda p, images: objective.model.apply(
                    {"params": p}, images, method=TwoTower.encode_image
                )
            )
            image = encode.lower(state.params, batch["image"]).compile().cost_analysis()["flops"]
        return step_flops, image

    unlocked, image_forward = flops(_config())
    locked, _ = flops(_config(**{"model__image__locked": True}))
    assert unlocked - locked >= 1.5 * image_forward


def test_locked_batchnorm_statistics_stay_as_they_were():
    """CLIP-Lite on a ResNet: with the image tower locked, its BatchNorm statistics and those of
    its MI block stay bitwise as they were; the text MI block's statistics move."""
    resnet = {"model__image__variant": "RN50", "model__image__size": 32, "model__image__width": 8}
    config = _config("cliplite_r50", **resnet, **{"model__image__locked": True})
    with built(config) as (_, state, step_fn, batch):
        start = jax.device_get(state.model_state)
        for _ in range(2):
            state, _ = step_fn(state, batch)
        stats = jax.device_get(state.model_state)["batch_stats"]
    assert _bitwise_equal(_tower(stats), _tower(start["batch_stats"]))
    assert "image_tower" in stats and "image_projection" in stats
    assert not _bitwise_equal(stats["text_projection"], start["batch_stats"]["text_projection"])


def test_accumulation_keeps_a_locked_tower_locked():
    """One step with the image tower locked, whole batch against 2 micro-batches: the tower is
    bitwise unchanged both ways, and the trained parameters agree."""
    after = {}
    for steps in (1, 2):
        config = _config(accum_steps=steps, **{"model__image__locked": True})
        config.optim.warmup_steps = 0  # the first step's rate is not 0
        with built(config) as (_, state, step_fn, batch):
            start = jax.device_get(state.params)
            after[steps] = jax.device_get(step_fn(state, batch)[0].params)
        assert _bitwise_equal(_tower(after[steps]), _tower(start))
        assert not _bitwise_equal(after[steps]["text_tower"], start["text_tower"])
    for want, got in zip(jax.tree.leaves(after[1]), jax.tree.leaves(after[2]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_frozen_regex_errors_are_one_line():
    config = _config(**{"optim__frozen": "vision/.*"})
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        with pytest.raises(ConfigError) as error:
            step.build(config, mesh)
        assert str(error.value) == (
            "config.optim.frozen='vision/.*' matches no parameter. Names are '/'-joined paths "
            "starting with image_projection, image_tower, log_scale, text_projection, text_tower "
            "(a tower: 'image_tower/.*')."
        )
        config.optim.frozen = "image_tower/(.*"
        with pytest.raises(ConfigError, match=r"^config.optim.frozen='image_tower/\(\.\*' is not"):
            step.build(config, mesh)


def test_frozen_mask_matches_whole_names():
    params = {"image_tower": {"a": np.zeros(2), "b": {"c": np.zeros(3)}}, "log_scale": np.zeros(())}
    assert optimizers.frozen_mask(params, "image_tower/.*") == {
        "image_tower": {"a": True, "b": {"c": True}},
        "log_scale": False,
    }
    assert optimizers.frozen_mask(params, "image_tower/b") == {
        "image_tower": {"a": False, "b": {"c": False}},
        "log_scale": False,
    }
    assert optimizers.frozen_mask(params, "") == {
        "image_tower": {"a": False, "b": {"c": False}},
        "log_scale": False,
    }


# ---------------------------------------------------------------------------- patch dropout


def test_patch_dropout_draws_from_the_step_key_and_resumes_exactly(tmp_path):
    """The dropped patches come from each step's key: a run stopped at 3 and resumed in a
    fresh `train.run` gives the uninterrupted run's losses exactly, and they differ from
    those without dropout."""
    settings = {"total_steps": 5, "log_every": 1, "ckpt_every": 3}
    dropping = _config(**settings, **{"model__image__patch_dropout": 0.5})
    runs = {}
    for name, config in (("a", dropping), ("plain", _config(**settings))):
        runs[name] = str(tmp_path / name)
        train.run(config, runs[name])
    assert all(_losses(runs["a"])[s] != _losses(runs["plain"])[s] for s in range(1, 6))
    resumed = str(tmp_path / "resumed")
    train.run(dropping, resumed, stop_at=3)
    train.run(dropping, resumed)
    assert _losses(resumed) == _losses(runs["a"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"model__image__patch_dropout": 1.0},
            "config.model.image.patch_dropout=1.0 must be in [0, 1): the fraction of patch "
            "tokens dropped in training (FLIP used 0.5 and 0.75).",
        ),
        (
            {"model__image__patch_dropout": 0.5, "model__image__variant": "RN50"},
            "config.model.image.patch_dropout=0.5 needs a ViT image tower; 'RN50' is a ResNet, "
            "which has no patch tokens.",
        ),
    ],
)
def test_patch_dropout_errors_are_one_line(tmp_path, fields, message):
    with pytest.raises(ConfigError) as error:
        config_lib.validate(_config(**fields), str(tmp_path), 8)
    assert str(error.value) == message
