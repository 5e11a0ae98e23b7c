"""Every objective's `:local` config trains on 8 devices: finite, decreasing loss, its metrics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import sharding
from clipjax.models.heads import MIBlock
from clipjax.objectives.base import Views
from tests.tiny import built, tiny_config

METRICS = {
    "clip": {"train/logit_scale"},
    "siglip": {"train/bias", "train/pos_logit_mean", "train/neg_logit_mean"},
    "cliplite": {"train/loss_cross", "train/loss_prior", "train/critic_pos", "train/critic_neg"},
    "declip": {
        "train/loss_mvs",
        "train/loss_iss",
        "train/loss_tss",
        "train/loss_nns",
        "train/mlm_accuracy",
        "train/nn_queue_fill",
    },
    "slip": {"train/loss_clip", "train/loss_ssl", "train/logit_scale"},
    "filip": {"train/loss_filip", "train/token_logit_scale"},
    "defilip": {"train/loss_mvs", "train/loss_nns", "train/loss_filip", "train/token_logit_scale"},
}


def tiny(config_name: str):
    c = tiny_config(config_name)
    c.optim.warmup_steps = 0
    c.optim.lr = c.optim.lr / 4  # one batch, many steps: a gentler rate keeps the descent smooth
    return c


def _train_a_few_steps(config, steps=8):
    """Losses of `steps` updates on one synthetic batch, and the last step's metrics."""
    with built(config) as (_, state, step_fn, batch):
        losses = []
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["train/loss"]))
    return losses, metrics


@pytest.mark.parametrize(
    "config_name",
    [
        "clip_vitb32",
        "siglip_vitb16",
        "cliplite_r50",
        "declip_vitb32",
        "slip_vitb32",
        "filip_vitb32",
        # DeCLIP's terms plus FILIP's: its weights and terms are checked in CI below
        # (`test_defilip_is_declips_terms_plus_filips_with_the_reference_weights`).
        pytest.param("defilip_vitb32", marks=pytest.mark.slow),
        # DeCLIP's heads and ResNet BatchNorm, each trained above; together they compile for
        # 40 s here, so only the full suite runs them (`pytest -m slow`).
        pytest.param("declip_r50", marks=pytest.mark.slow),
    ],
)
def test_local_config_trains(config_name):
    config = tiny(config_name)
    losses, metrics = _train_a_few_steps(config)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert METRICS[config.objective] <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_cliplite_optional_view_terms_and_text_prior():
    config = tiny("cliplite_r50")
    config.cliplite.image_view_weight = 0.5
    config.cliplite.caption_view_weight = 0.5
    config.cliplite.text_prior = True
    losses, metrics = _train_a_few_steps(config)
    assert losses[-1] < losses[0]
    assert {"train/loss_image_view", "train/loss_caption_view"} <= set(metrics)
    weighted = 0.9 * metrics["train/loss_cross"] + 0.1 * metrics["train/loss_prior"]
    views = 0.5 * (metrics["train/loss_image_view"] + metrics["train/loss_caption_view"])
    np.testing.assert_allclose(metrics["train/loss"], weighted + views, rtol=1e-5)


def test_clip_caps_the_logit_scale_at_100():
    with built(tiny("clip_vitb32")) as (objective, state, _, batch):
        metrics = jax.jit(lambda params: objective.loss(params, {}, batch, {}, None)[1][0])
        np.testing.assert_allclose(metrics(state.params)["train/logit_scale"], 1 / 0.07, rtol=1e-5)
        metrics = metrics({**state.params, "log_scale": jnp.asarray(10.0)})
    np.testing.assert_allclose(metrics["train/logit_scale"], 100.0, rtol=1e-6)
    high = objective.constrain({"log_scale": jnp.asarray(10.0)})
    np.testing.assert_allclose(high["log_scale"], np.log(100.0), rtol=1e-7)


@pytest.mark.parametrize("config_name", ["clip_vitb32", "declip_vitb32"])
def test_log_scale_range_is_applied_after_each_update(config_name):
    """Each objective projects θ into its configured range: DeCLIP's official [3, 6] by
    default, and any range set in the config (here CLIP given DeCLIP's floor)."""
    config = tiny(config_name)
    objective_config = config.clip if config_name == "clip_vitb32" else config.declip
    objective_config.log_scale_range = (3.0, 4.5)
    with built(config) as (objective, state, step_fn, batch):
        assert state.params["log_scale"] < 3.0  # ln(1/0.07) = 2.66, below the range
        state, metrics = step_fn(state, batch)
    assert state.params["log_scale"] == 3.0
    before = 1 / 0.07 if config_name == "declip_vitb32" else np.exp(3.0)  # CLIP clips in forward
    np.testing.assert_allclose(metrics["train/logit_scale"], before, rtol=1e-5)
    assert objective.constrain({"log_scale": jnp.asarray(7.0)})["log_scale"] == 4.5


def test_declip_default_log_scale_range_is_the_official_one():
    with built(tiny("declip_vitb32")) as (objective, _, _, _):
        assert objective.constrain({"log_scale": jnp.asarray(7.0)})["log_scale"] == 6.0
        assert objective.constrain({"log_scale": jnp.asarray(1.0)})["log_scale"] == 3.0


@pytest.mark.parametrize("bad", [(4.0, 3.0), (1.0,), (1.0, 2.0, 3.0)])
def test_bad_log_scale_range_is_one_clear_error(bad):
    from clipjax.errors import ConfigError

    config = tiny("clip_vitb32")
    config.clip.log_scale_range = bad
    match = r"config.clip.log_scale_range=.* must be \(low, high\) with low <= high"
    with pytest.raises(ConfigError, match=match), built(config):
        pass


def test_siglip_starts_from_its_scale_and_bias():
    with built(tiny("siglip_vitb16")) as (_, state, _, _):
        params = state.params
    np.testing.assert_allclose(jnp.exp(params["log_scale"]), 10.0, rtol=1e-6)
    assert params["bias"] == -10.0


def test_mi_block_shortcut_starts_near_identity():
    params = MIBlock(features=48).init(jax.random.PRNGKey(0), np.zeros((2, 32)))["params"]
    kernel = np.asarray(nn.unbox(params)["shortcut"]["kernel"])
    assert kernel.shape == (32, 48)
    np.testing.assert_array_equal(np.diag(kernel), 1.0)
    off_diagonal = kernel[~np.eye(32, 48, dtype=bool)]
    assert np.abs(off_diagonal).max() <= 0.01
    assert off_diagonal.std() > 0.003  # uniform on (-0.01, 0.01), not zeros
    assert "bias" not in nn.unbox(params)["shortcut"]


def test_mi_block_shortcut_without_room_for_identity_keeps_default_init():
    params = MIBlock(features=16).init(jax.random.PRNGKey(0), np.zeros((2, 32)))["params"]
    kernel = np.asarray(nn.unbox(params)["shortcut"]["kernel"])
    assert not np.allclose(np.diag(kernel), 1.0)


@pytest.mark.parametrize("masked_contrastive", [True, False])
def test_declip_masked_caption_feeds_the_contrastive_terms_only_when_asked(masked_contrastive):
    config = tiny("declip_vitb32")
    config.declip.masked_caption_contrastive = masked_contrastive
    with built(config) as (objective, state, _, batch):
        expected = ("mlm", "eda") if masked_contrastive else ("mlm", "plain", "eda")
        assert objective.views.text_views == expected

        loss_fn = jax.jit(objective.loss)  # one compile; eager shard_map is slow

        def terms(batch):
            loss = loss_fn(state.params, state.model_state, batch, state.objective_state, None)
            return {k: float(v) for k, v in loss[1][0].items() if k.startswith("train/loss_")}

        # Another masked caption: the MLM term changes; MVS (and NNS) only if t¹ is the masked one.
        other = {**batch, "text_mlm": jnp.roll(batch["text_mlm"], 1, axis=0)}
        before, after = terms(batch), terms(other)
    assert after["train/loss_tss"] != before["train/loss_tss"]
    assert (after["train/loss_mvs"] != before["train/loss_mvs"]) == masked_contrastive


@pytest.mark.parametrize("multi_view", [True, False])
def test_declip_without_eda_pairs_the_images_with_the_caption_itself(multi_view):
    config = tiny("declip_vitb32")
    config.declip.masked_caption_contrastive = False
    config.declip.eda = False
    config.declip.multi_view = multi_view
    with built(config) as (objective, state, _, batch):
        assert objective.views.text_views == ("mlm", "plain")
        args = (state.params, state.model_state, batch, state.objective_state, None)
        mvs = jax.jit(objective.loss)(*args)[1][0]["train/loss_mvs"]
        # Both text views are the plain caption: MVS is the mean of CLIP's loss per image view, or
        # CLIP's loss on the first image view without multi-view supervision.
        forward = jax.jit(lambda p, m, b: objective.forward(p, m, b, method=objective._forward))
        out, _ = forward(state.params, state.model_state, batch)
    scale = jnp.exp(out["log_scale"])
    np.testing.assert_allclose(out["texts"][0], out["texts"][1])
    images = [np.asarray(i, np.float64) for i in out["images"][: 2 if multi_view else 1]]
    text = np.asarray(out["texts"][0], np.float64)
    expected = np.mean([_clip_loss_numpy(i, text, float(scale)) for i in images])
    np.testing.assert_allclose(mvs, expected, rtol=1e-4)


def _clip_loss_numpy(images, texts, scale):
    logits = scale * images @ texts.T
    labels = np.arange(len(images))

    def ce(x):
        x = x - x.max(1, keepdims=True)
        return -(x[labels, labels] - np.log(np.exp(x).sum(1))).mean()

    return (ce(logits) + ce(logits.T)) / 2


def test_declip_terms_are_the_same_with_the_infonce_rings():
    """`clip.chunked` swaps MVS's and NNS's all-gather InfoNCE for the rings: on 8 devices the
    four terms, their gradients with respect to the views and the new queue are unchanged."""
    from clipjax.objectives import declip

    rng = np.random.default_rng(0)
    b, d, length, vocab = 32, 16, 6, 11

    def unit(*shape):
        x = rng.normal(size=shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    views = {
        "images": [unit(b, d), unit(b, d)],
        "texts": [unit(b, d), unit(b, d)],
        "simsiam": [tuple(rng.normal(size=(2, b, 8)).astype(np.float32)) for _ in range(2)],
        "mlm": (
            rng.normal(size=(b, length, vocab)).astype(np.float32),
            rng.integers(0, vocab, (b, length)).astype(np.int32),
        ),
    }
    queue = {"embeds": unit(64, d), "pointer": np.int32(0), "count": np.int32(64)}
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    batched, whole = jax.sharding.PartitionSpec(sharding.BATCH_AXES), jax.sharding.PartitionSpec()
    queue_specs = {"embeds": batched, "pointer": whole, "count": whole}
    results = []
    for chunked in (False, True):
        terms = jax.shard_map(
            functools.partial(
                declip._terms, axis_name=sharding.BATCH_AXES, multi_view=True, chunked=chunked
            ),
            mesh=mesh,
            in_specs=(batched, queue_specs, whole),
            out_specs=(whole, queue_specs),
        )

        def total(embeds, terms=terms):  # gradients with respect to the contrastive views
            values, new_queue = terms({**views, **embeds}, queue, 7.5)
            return sum(values[k] for k in ("mvs", "iss", "tss", "nns")), (values, new_queue)

        embeds = {"images": views["images"], "texts": views["texts"]}
        (_, (values, new_queue)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(embeds)
        results.append((values, new_queue, grads))
    (values, new_queue, grads), (ring_values, ring_queue, ring_grads) = results
    for key in values:
        np.testing.assert_allclose(ring_values[key], values[key], rtol=1e-5, atol=1e-6)
    for got, want in zip(
        jax.tree.leaves((ring_queue, ring_grads)), jax.tree.leaves((new_queue, grads)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_views_validation():
    assert Views(text_views=["mlm", "eda"]).text_views == ("mlm", "eda")
    for bad in (
        {"image_views": 4},
        {"image_views": 2, "image_augments": ({},)},
        {"text_views": ()},
        {"text_views": ("plain", "plain")},
        {"text_views": ("bert",)},
    ):
        with pytest.raises(ValueError, match="Views."):
            Views(**bad)


def test_cliplite_adversarial_prior_gradients():
    """`prior_mode="adversarial"`: the discriminator's gradient is the cooperative one (it learns
    the same prior term), while the towers', which in the cooperative mode include
    w·∇ mean softplus(D(f)), now include w·∇ mean softplus(−D(f)) instead: the difference of
    the two is −w·∇ mean D(f), since softplus(−x) − softplus(x) = −x."""
    from clipjax.objectives.cliplite import ClipLiteModel

    grads = {}
    for mode in ("cooperative", "adversarial"):
        config = tiny("cliplite_r50")
        config.cliplite.prior_mode = mode
        with built(config) as (objective, state, _, batch):

            def total(params, o=objective, s=state):
                return o.loss(params, s.model_state, batch, s.objective_state, s.rng)[0]

            grads[mode] = jax.jit(jax.grad(total))(state.params)

            def mean_logit(params, o=objective, s=state):
                out, _ = o.forward(params, s.model_state, batch, {}, method=_towers)
                fixed = {"params": jax.lax.stop_gradient(params)}
                return o.model.apply(
                    fixed, "image", out["features"], method=ClipLiteModel.discriminate
                ).mean()

            d_mean_logit = jax.jit(jax.grad(mean_logit))(state.params)
            weight = config.cliplite.prior_weight
    cooperative, adversarial = grads["cooperative"], grads["adversarial"]
    for got, want in zip(
        jax.tree.leaves(adversarial["image_prior"]),
        jax.tree.leaves(cooperative["image_prior"]),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    tower = "image_tower"
    difference = jax.tree.map(lambda a, c: a - c, adversarial[tower], cooperative[tower])
    expected = jax.tree.map(lambda g: -weight * g, d_mean_logit[tower])
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
    assert scale > 0
    for got, want in zip(jax.tree.leaves(difference), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-3 * scale)


def _towers(model, batch, _, train):
    return model.encode_image(batch["image"], train=train)


def test_cliplite_rejects_unknown_prior_mode_and_negative():
    from clipjax.errors import ConfigError

    for field, value in (("prior_mode", "minimax"), ("negative", "hardest")):
        config = tiny("cliplite_r50")
        config.cliplite[field] = value
        match = f"config.cliplite.{field}='{value}' is unknown"
        with pytest.raises(ConfigError, match=match), built(config):
            pass


# ------------------------------------------------------------------ SLIP, FILIP and DeFILIP


def _steps_on(config, devices, steps=5):
    """Losses of `steps` updates on the synthetic batch, on a mesh over `devices`."""
    from clipjax import bench, step

    mesh = sharding.make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, init, _, step_fn = step.build(config, mesh)
        state = init(jax.random.PRNGKey(0))
        batch = bench.synthetic_batch(config, mesh, objective.views)
        losses = []
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["train/loss"]))
        return np.asarray(losses)


@pytest.mark.parametrize(
    "config_name",
    ["slip_vitb32", "filip_vitb32", pytest.param("defilip_vitb32", marks=pytest.mark.slow)],
)
def test_eight_devices_train_as_one(config_name):
    """Five steps on 8 fake devices give one device's losses within 1e-6 of their value, in the
    ring forms (BatchNorm heads synced: per-device statistics differ by design). Relative:
    SLIP's losses of 4 to 10 are float32 numbers 5e-7 to 1e-6 apart, so an absolute 1e-6 would
    ask for their last bit. Parameters are not compared: Adam turns gradients that are zero up
    to rounding into steps of ±lr."""
    config = tiny(config_name)
    config.filip.chunked = config.clip.chunked = True
    config.slip.sync_bn = config.declip.sync_bn = True
    config.mesh.data = -1
    eight, one = _steps_on(config, jax.devices()), _steps_on(config, jax.devices()[:1])
    assert eight[-1] < eight[0]
    np.testing.assert_allclose(eight, one, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "config_name", ["slip_vitb32", pytest.param("filip_vitb32", marks=pytest.mark.slow)]
)
def test_a_stopped_run_resumes_exactly(config_name, tmp_path):
    """Stopped at step 3 and resumed, a run gives the uninterrupted run's losses bit for bit
    (SLIP: the SimCLR head's BatchNorm statistics are in the checkpoint)."""
    from clipjax import train
    from clipjax.metrics import read_metrics

    config = tiny(config_name)
    config.total_steps, config.log_every, config.ckpt_every = 5, 1, 3
    config.evals = {}

    def losses(workdir):
        rows = read_metrics(str(workdir / "metrics.jsonl"))[0]
        return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}

    train.run(config, str(tmp_path / "straight"))
    train.run(config, str(tmp_path / "resumed"), stop_at=3)
    train.run(config, str(tmp_path / "resumed"))
    want = losses(tmp_path / "straight")
    assert sorted(want) == [1, 2, 3, 4, 5]
    assert losses(tmp_path / "resumed") == want


def test_filip_accumulates_its_gradient_exactly():
    """FILIP's loss is a function of each example's tokens: two micro-batches give the whole
    batch's loss within 1e-6 and its gradients within float32 rounding."""
    from clipjax import step

    config = tiny("filip_vitb32")
    config.batch_size = 32
    results = []
    with built(config) as (objective, state, _, batch):
        args = (state.params, state.model_state, batch, state.objective_state, state.rng)
        whole = jax.value_and_grad(objective.loss, has_aux=True)
        accumulated = functools.partial(step.accumulated_grads, objective, steps=2)
        for grad_fn in (whole, accumulated):
            (loss, _), grads = jax.device_get(jax.jit(grad_fn)(*args))
            results.append((loss, grads))
    (want_loss, want_grads), (loss, grads) = results
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    assert scale > 1e-3
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_slip_views_are_a_base_view_and_two_mocov2_views():
    from clipjax.objectives.slip import Slip

    config = tiny("slip_vitb32")
    objective = Slip(config, sharding.make_mesh(config.mesh))
    assert objective.views.image_keys == ("image", "image_2", "image_3")
    base, *ssl = objective.views.image_augments
    assert base is None  # config.data.augment
    assert ssl == [{"recipe": "mocov2", "crop_scale": (0.2, 1.0), "flip": True}] * 2


def test_defilip_is_declips_terms_plus_filips_with_the_reference_weights():
    """L = 0.4·MVS + 0.2·ISS + 0.2·TSS + 0.2·NNS + 0.2·FILIP, FILIP's term taken on image view
    1 and the masked caption (its tokens and mask recomputed here from the forward pass)."""
    from clipjax import losses
    from clipjax.models.text import caption_mask

    config = tiny("defilip_vitb32")
    with built(config) as (objective, state, _, batch):
        assert objective.weights == {"mvs": 0.4, "iss": 0.2, "tss": 0.2, "nns": 0.2, "filip": 0.2}
        args = (state.params, state.model_state, batch, state.objective_state, None)
        loss, (metrics, _, _) = jax.jit(objective.loss)(*args)
        forward = jax.jit(lambda p, m, b: objective.forward(p, m, b, method=objective._forward))
        out, _ = forward(state.params, state.model_state, batch)
    weighted = sum(w * metrics[f"train/loss_{k}"] for k, w in objective.weights.items())
    np.testing.assert_allclose(loss, weighted, rtol=1e-6)
    scale = np.exp(float(state.params["token_heads"]["log_scale"]))
    mask = np.asarray(caption_mask(batch["text_mlm"]))
    want = losses.filip_loss(
        np.asarray(out["image_tokens"]), np.asarray(out["text_tokens"]), mask, scale, top_k=4
    )
    np.testing.assert_allclose(metrics["train/loss_filip"], want, rtol=1e-5)


def test_slips_three_views_each_take_their_own_augmentation(tok):
    """The pipeline makes SLIP's base view with `config.data.augment` and its two SSL views with
    their own recipe, drawing them in order from the element's rng: the base view is the one a
    one-view objective gets."""
    from clipjax.data import image_ops, pipeline, shapes

    base, ssl = image_ops.Augment(), image_ops.Augment("mocov2", (0.2, 1.0))
    record = {"key": "k", "image": shapes.ShapesSource("train")[0]["image"], "caption": "a"}
    three = pipeline._MakeViews(3, ("plain",), tok, 24, 48, base, (None, ssl, ssl))
    got = three.random_map(record, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    image = np.asarray(record["image"])
    want = [a(image, rng, 24) for a in (base, ssl, ssl)]
    for key, view in zip(("image", "image_2", "image_3"), want, strict=True):
        np.testing.assert_array_equal(got[key], view)
    one = pipeline._MakeViews(1, ("plain",), tok, 24, 48, base)
    np.testing.assert_array_equal(
        one.random_map(record, np.random.default_rng(0))["image"], want[0]
    )
    assert not np.array_equal(got["image_2"], got["image_3"])
