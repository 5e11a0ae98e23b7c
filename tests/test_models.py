"""Tests for clipjax/models: shapes, parameter count, pooling, causality, logical axis names."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import sharding
from clipjax.config import base_config
from clipjax.models import layers, precision
from clipjax.models.text import TextTransformer
from clipjax.models.two_tower import IMAGE_MEAN, IMAGE_STD, TwoTower, standardize
from clipjax.models.vit import VisionTransformer, drop_patches, vit_size


def model_config(**overrides) -> ml_collections.ConfigDict:
    """`config.model` of the default (ViT-B/32) config, with dotted-key overrides."""
    c = base_config().model
    c.update_from_flattened_dict(overrides)
    return c


TINY = {
    "embed_dim": 32,
    "image.variant": "Ti/8",
    "image.size": 32,
    "image.depth": 1,
    "text.width": 64,
    "text.depth": 1,
    "text.heads": 4,
    "text.context_length": 12,
    "text.vocab_size": 100,
}


def inputs(config, batch=2):
    size, length = config.image.size, config.text.context_length
    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    tokens = np.zeros((batch, length), np.int32)
    for i, n in enumerate(range(5, 5 + batch)):  # BOS, 3+i words, EOS, pads
        tokens[i, :n] = [2, *range(10, 10 + n - 2), 3]
    return images, jnp.asarray(tokens)


@pytest.fixture(scope="module")
def tiny():
    config = model_config(**TINY)
    model = TwoTower.from_config(config)
    images, tokens = inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    return model, nn.unbox(variables), images, tokens


def test_vitb32_parameter_count_matches_open_clip():
    config = model_config()
    model = TwoTower.from_config(config)
    images, tokens = inputs(config, batch=1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert count == 151_277_313


def test_vit_size_table():
    assert vit_size("Ti/16") == (192, 12, 768, 3, 16)
    assert vit_size("S/16") == (384, 12, 1536, 6, 16)
    assert vit_size("M/32") == (512, 12, 2048, 8, 32)
    assert vit_size("B/32") == (768, 12, 3072, 12, 32)
    assert vit_size("L/14") == (1024, 24, 4096, 16, 14)
    assert vit_size("H/14") == (1280, 32, 5120, 16, 14)
    assert vit_size("Ti/8") == (192, 12, 768, 3, 8)


@pytest.mark.parametrize("variant", ["X/16", "B", "B/", "B/0", "B/x", "b/32"])
def test_vit_size_rejects_unknown_variant(variant):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
        vit_size(variant)


def test_vit_rejects_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"model\.image\.size=30x30 .* patch size 8"):
        VisionTransformer("Ti/8", depth=1).init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_vit_depth_override_and_pooled_shape():
    model = VisionTransformer("Ti/8", depth=1)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    params = nn.unbox(variables)["params"]
    assert list(params["transformer"]) == ["block_00"]
    assert params["pos_embed"].shape == (1 + 4, 192)  # class token + 2x2 patches
    pooled = jax.eval_shape(model.apply, variables, jnp.zeros((3, 16, 16, 3)))
    assert pooled.shape == (3, 192)


def test_text_pools_the_end_of_text_state(tiny):
    model, variables, _, tokens = tiny
    out = model.apply(variables, tokens, method=TwoTower.encode_text)
    lengths = np.asarray((tokens != 0).sum(axis=1))
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(out["features"][i], out["states"][i, n - 1])
    # A token before the end of text changes the feature.
    changed = model.apply(variables, tokens.at[:, 1].set(50), method=TwoTower.encode_text)
    assert not np.allclose(changed["features"], out["features"], atol=1e-4)


def test_text_attention_is_causal():
    model = TextTransformer(vocab_size=100, context_length=8, width=32, depth=2, heads=2)
    tokens = jnp.asarray([[2, 11, 12, 13, 14, 15, 16, 3]])
    variables = model.init(jax.random.key(0), tokens)
    apply = jax.jit(model.apply)
    _, states = apply(variables, tokens)
    _, changed = apply(variables, tokens.at[:, 4:].set(40))
    np.testing.assert_allclose(changed[:, :4], states[:, :4], atol=1e-6)
    assert not np.allclose(changed[:, 4:], states[:, 4:], atol=1e-4)


def test_two_tower_outputs(tiny):
    model, variables, images, tokens = tiny
    out = model.apply(variables, images, tokens)
    assert out["image"]["features"].shape == (2, 192)
    assert out["text"]["features"].shape == (2, 64)
    assert out["text"]["states"].shape == (2, 12, 64)
    for tower in ("image", "text"):
        assert out[tower]["embed"].shape == (2, 32)
        np.testing.assert_allclose(jnp.linalg.norm(out[tower]["embed"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.exp(out["log_scale"]), 1 / 0.07, rtol=1e-5)
    assert "bias" not in out


def test_standardize_on_the_device_equals_the_host_normalisation():
    """Every uint8 level of each channel: the jitted standardisation equals the float32 host
    formula it replaced to 1e-6, and a float64 reference to float32 precision."""
    pixels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None]  # (1, 256, 3)
    on_device = np.asarray(jax.jit(standardize)(pixels))
    assert on_device.dtype == np.float32
    host = (pixels.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    np.testing.assert_allclose(on_device, host, rtol=0, atol=1e-6)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's, as OpenAI published them
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(on_device, (pixels / 255.0 - mean) / std, rtol=0, atol=1e-6)
    standardised = np.asarray(host[:, :4])
    np.testing.assert_array_equal(jax.jit(standardize)(standardised), standardised)
    assert jax.jit(standardize, static_argnums=1)(pixels, jnp.bfloat16).dtype == jnp.bfloat16


def test_encode_image_standardises_uint8_pixels(tiny):
    model, variables, _, _ = tiny
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    host = (pixels.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    encode = jax.jit(lambda x: model.apply(variables, x, method=TwoTower.encode_image)["embed"])
    np.testing.assert_allclose(encode(pixels), encode(host), rtol=0, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    config = model_config(**TINY, dtype="bfloat16")
    model = TwoTower.from_config(config)
    images, tokens = inputs(config)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
    out = jax.jit(model.apply)(variables, images, tokens)
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}


def test_every_parameter_has_one_logical_name_per_dimension():
    config = model_config(**TINY)
    model = TwoTower.from_config(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs(config))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
    specs = nn.get_partition_spec(boxed)
    assert specs["image_tower"]["transformer"]["block_00"]["attn"]["query"]["kernel"] == (
        jax.sharding.PartitionSpec("embed", "heads", "kv")
    )
    assert specs["text_tower"]["token_embed"]["embedding"] == (
        jax.sharding.PartitionSpec("vocab", "embed")
    )
    assert specs["text_projection"]["kernel"] == jax.sharding.PartitionSpec("embed", "joint")


def test_sharded_over_a_mesh_matches_unsharded():
    # Every logical name must resolve under the real rules (data, fsdp and model axes all > 1).
    config = model_config(**{**TINY, "image.variant": "S/8"})  # 6 heads split over model=2
    model = TwoTower.from_config(config)
    images, tokens = inputs(config, batch=4)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    expected = jax.jit(model.apply)(variables, images, tokens)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "model": 2}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
        shardings = sharding.logical_sharding(mesh, nn.get_partition_spec(boxed))
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images, tokens)
        kernel = variables["params"]["image_tower"]["transformer"]["block_00"]["mlp"]["fc_in"]
        assert kernel["kernel"].value.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
        batch = jax.device_put((images, tokens), sharding.batch_sharding(mesh))
        out = jax.jit(model.apply)(variables, *batch)
    for tower in ("image", "text"):
        np.testing.assert_allclose(out[tower]["embed"], expected[tower]["embed"], atol=1e-5)


def _stacked(variables, tower: str, depth: int):
    """Unscanned variables with `tower`'s block_00.. leaves stacked into one `blocks` module."""
    params = flax.core.unfreeze(variables)["params"]
    transformer = params[tower]["transformer"]
    blocks = [transformer.pop(f"block_{i:02d}") for i in range(depth)]
    transformer["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {"params": params}


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_and_rematerialised_towers_equal_the_unrolled_one(remat):
    """scan_layers runs the same blocks (parameters stacked depth-first) and remat changes
    only what the backward pass recomputes: equal outputs and gradients. In float32, where
    the two programs' different fusions round alike (bfloat16 would round in other places)."""
    overrides = {**TINY, "image.depth": 3, "text.depth": 2, "dtype": "float32"}
    config = model_config(**overrides)
    images, tokens = inputs(config)
    plain = TwoTower.from_config(config)
    variables = nn.unbox(jax.jit(plain.init)(jax.random.key(0), images, tokens))
    scanned = TwoTower.from_config(model_config(**overrides, scan_layers=True, remat=remat))
    stacked = _stacked(_stacked(variables, "image_tower", 3), "text_tower", 2)
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), images, tokens)
    assert jax.tree.map(jnp.shape, nn.unbox(shapes)) == jax.tree.map(jnp.shape, stacked)

    def loss(model, variables):
        out = model.apply(variables, images, tokens)
        return jnp.sum(out["image"]["embed"] @ out["text"]["embed"].T)

    value, grads = jax.jit(jax.value_and_grad(lambda v: loss(plain, v)))(variables)
    scanned_value, scanned_grads = jax.jit(jax.value_and_grad(lambda v: loss(scanned, v)))(stacked)
    np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
    want = _stacked(_stacked(grads, "image_tower", 3), "text_tower", 2)
    for got, expected in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_scanned_parameters_keep_their_logical_names_plus_an_unsharded_depth_axis():
    config = model_config(**TINY, scan_layers=True)
    model = TwoTower.from_config(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs(config))["params"]
    specs = nn.get_partition_spec(boxed)
    assert specs["image_tower"]["transformer"]["blocks"]["attn"]["query"]["kernel"] == (
        jax.sharding.PartitionSpec(None, "embed", "heads", "kv")
    )


def test_unknown_remat_policy_is_one_line():
    config = model_config(**TINY, remat="some")
    model = TwoTower.from_config(config)
    with pytest.raises(ValueError, match="model.remat='some' is unknown; use one of none, full"):
        model.init(jax.random.key(0), *inputs(config))


def _softmax_attention(query, key, value, *, causal, implementation="auto"):
    """The explicit formula `layers.Attention` computed before it called
    `jax.nn.dot_product_attention`: heads first, logits under the precision policy, a float32
    softmax. (With positions first, XLA:CPU cannot run its bfloat16 backward products.)"""
    del implementation
    dtype, length = query.dtype, query.shape[1]
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    logits = precision.einsum("BHTD,BHSD->BHTS", query, key, dtype) * query.shape[-1] ** -0.5
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -1e30)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.swapaxes(precision.einsum("BHTS,BHSD->BHTD", weights, value, dtype), 1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_attend_equals_float64_numpy(causal):
    q, k, v = (np.random.default_rng(i).normal(size=(2, 7, 3, 8)) for i in range(3))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    if causal:
        logits = np.where(np.tril(np.ones((7, 7), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", weights, v)
    got = layers.attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), causal=causal)
    np.testing.assert_allclose(got, want, atol=1e-6)


# bfloat16: both products round their operands to 8 bits of mantissa, and the fused path's
# backward rounds its cotangents in other places than the explicit formula's custom VJP.
TOLERANCE = {"float32": (1e-6, 1e-6), "bfloat16": (2e-2, 2e-2)}


@pytest.mark.parametrize(
    "dtype,scan,remat",
    [
        ("float32", False, "none"),
        ("float32", True, "full"),
        ("bfloat16", False, "none"),
        ("bfloat16", True, "full"),
    ],
)
def test_fused_attention_equals_the_explicit_formula(monkeypatch, dtype, scan, remat):
    """Both towers (the ViT's full attention, the text tower's causal one): embeddings and
    every parameter's gradient through `jax.nn.dot_product_attention` equal those of the
    explicit softmax formula."""
    depth = 2 if scan else 1
    overrides = {**TINY, "image.depth": depth, "text.depth": depth, "dtype": dtype}
    config = model_config(**overrides, scan_layers=scan, remat=remat)
    model = TwoTower.from_config(config)
    images, tokens = inputs(config)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))

    def loss(variables):
        out = model.apply(variables, images, tokens)
        return jnp.sum(out["image"]["embed"] @ out["text"]["embed"].T), out

    def value_and_grads():
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)

    (value, out), grads = value_and_grads()
    monkeypatch.setattr(layers, "attend", _softmax_attention)
    (want_value, want_out), want_grads = value_and_grads()
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(value, want_value, rtol=rtol, atol=atol)
    for tower in ("image", "text"):
        np.testing.assert_allclose(out[tower]["embed"], want_out[tower]["embed"], rtol, atol)
    flat, want_flat = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, want_grads))
    for (path, got), (_, want) in zip(flat, want_flat, strict=True):
        scale = max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=str(path))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [5, 17, 77])
def test_padded_attention_equals_the_formula_with_every_gradient(causal, length):
    """The path cuDNN takes (`padded_attention`: padded to a multiple of 8, the padding masked
    by the sequence-length arguments, then dropped), run by XLA's implementation on the CPU:
    its output and its gradients with respect to q, k and v equal the unpadded formula's, in
    float32 to 1e-6."""
    q, k, v = (
        jnp.asarray(np.random.default_rng(i).normal(size=(2, length, 3, 8)), jnp.float32)
        for i in range(3)
    )
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def padded(q, k, v):
        return layers.padded_attention(q, k, v, causal=causal, implementation="xla", multiple=8)

    def formula(q, k, v):
        return _softmax_attention(q, k, v, causal=causal)

    for fn in (padded, formula):
        assert fn(q, k, v).shape == q.shape
    np.testing.assert_allclose(padded(q, k, v), formula(q, k, v), atol=1e-6)
    grads = [
        jax.grad(lambda *x, fn=fn: jnp.sum(fn(*x) * cotangent), argnums=(0, 1, 2))(q, k, v)
        for fn in (padded, formula)
    ]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_choose_attention_takes_cudnn_only_where_it_applies():
    choose = layers.choose_attention
    assert choose("auto", jnp.bfloat16, "gpu", (64,)) == "cudnn"
    assert choose("auto", jnp.float16, "cuda", (64, 128)) == "cudnn"
    assert choose("auto", jnp.float32, "gpu", (64,)) == "xla"  # cuDNN takes 16-bit operands
    assert choose("auto", jnp.bfloat16, "gpu", (64, 12)) == "xla"  # a head dim it refuses
    assert choose("auto", jnp.bfloat16, "tpu", (64,)) == "xla"
    assert choose("cudnn", jnp.bfloat16, "cpu") == "cudnn"  # asked for by name: as asked


def test_unknown_attention_implementation_is_one_line():
    config = model_config(**TINY, attention="flash")
    model = TwoTower.from_config(config)
    with pytest.raises(ValueError, match="model.attention='flash' is unknown; use one of auto"):
        model.init(jax.random.key(0), *inputs(config))


# ---------------------------------------------------------------------------- patch dropout


def test_drop_patches_keeps_the_class_token_and_a_random_subset_of_each_examples_patches():
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1 + 16, 4)), jnp.float32)
    kept = drop_patches(tokens, jax.random.key(1), 0.75)
    assert kept.shape == (3, 1 + 4, 4)
    np.testing.assert_array_equal(kept[:, 0], tokens[:, 0])
    chosen = []
    for b in range(3):  # each kept token is one of that example's patches, none twice
        rows = [int(np.flatnonzero((tokens[b, 1:] == token).all(-1))[0]) for token in kept[b, 1:]]
        assert len(set(rows)) == 4
        chosen.append(sorted(rows))
    assert len({tuple(rows) for rows in chosen}) > 1  # drawn per example
    np.testing.assert_array_equal(drop_patches(tokens, jax.random.key(1), 0.75), kept)
    assert not np.array_equal(drop_patches(tokens, jax.random.key(2), 0.75), kept)
    assert drop_patches(tokens, jax.random.key(1), 0.99).shape == (3, 2, 4)  # at least one


def test_patch_dropout_drops_tokens_in_training_only():
    """Ti/8 on 32 px: 16 patches. In training with p = 0.5 the transformer sees the class token
    and 8 patches, drawn from the `patch_dropout` key; evaluating drops none, giving the
    output of the same weights without patch dropout."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    plain = VisionTransformer("Ti/8", depth=1)
    dropping = VisionTransformer("Ti/8", depth=1, patch_dropout=0.5)
    params = plain.init(jax.random.key(0), images)

    def train(key):
        out, seen = dropping.apply(
            params, images, train=True, rngs={"patch_dropout": key}, capture_intermediates=True
        )
        return out, seen["intermediates"]["ln_pre"]["__call__"][0].shape

    out, shape = train(jax.random.key(1))
    assert shape == (2, 1 + 8, vit_size("Ti/8")[0])
    np.testing.assert_array_equal(train(jax.random.key(1))[0], out)
    assert not np.allclose(train(jax.random.key(2))[0], out)
    np.testing.assert_array_equal(dropping.apply(params, images), plain.apply(params, images))
    assert not np.allclose(out, plain.apply(params, images))
