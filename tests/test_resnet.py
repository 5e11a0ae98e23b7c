"""Tests for clipjax/models/resnet.py: sizes, parameter counts, BatchNorm modes, sharding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import sharding
from clipjax.config import base_config
from clipjax.models.resnet import ModifiedResNet, resnet_size
from clipjax.models.two_tower import TwoTower

# Rules for the convolution axes, used here until clipjax/sharding.py carries them.
CONV_RULES = (("conv_in", None), ("conv_out", "fsdp"))
RULES = sharding.LOGICAL_RULES + tuple(
    rule for rule in CONV_RULES if rule[0] not in dict(sharding.LOGICAL_RULES)
)

TINY = ModifiedResNet("RN50", width=8)  # RN50's blocks, 256 final channels, 4 heads
TINY_TWO_TOWER = TwoTower(
    embed_dim=32,
    image_variant="RN50",
    image_width=8,
    text_vocab_size=100,
    text_context_length=8,
    text_width=32,
    text_depth=1,
    text_heads=2,
)


def key(seed=0):
    # rbg keys: on CPU the init of ~170 parameters compiles about 3x faster than with threefry.
    return jax.random.key(seed, impl="unsafe_rbg")


def images(batch=4, size=32):
    return jax.random.normal(jax.random.key(1), (batch, size, size, 3))


def tokens(batch=4):
    return jnp.tile(jnp.asarray([2, 10, 11, 12, 3, 0, 0, 0], jnp.int32), (batch, 1))


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.fixture(scope="module")
def tiny_two_tower():
    """Variables of TINY_TWO_TOWER, whose image tower is TINY: one init (the slow compile)."""
    return nn.unbox(jax.jit(TINY_TWO_TOWER.init)(key(), images(), tokens()))


@pytest.fixture(scope="module")
def tiny_variables(tiny_two_tower):
    """TINY's variables with every block's last BN scale set to 1: CLIP initialises them to 0,
    which would hide the blocks' convolutions from an output comparison."""
    variables = {name: tree["image_tower"] for name, tree in tiny_two_tower.items()}
    variables["params"] = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.ones_like(x) if path[-2].key == "bn3" and path[-1].key == "scale" else x
        ),
        variables["params"],
    )
    return variables


def test_resnet_size_table():
    assert resnet_size("RN50") == ((3, 4, 6, 3), 64, 32, 1024, 224)
    assert resnet_size("RN101") == ((3, 4, 23, 3), 64, 32, 512, 224)
    assert resnet_size("RN50x4") == ((4, 6, 10, 6), 80, 40, 640, 288)
    assert resnet_size("RN50x16") == ((6, 8, 18, 8), 96, 48, 768, 384)


@pytest.mark.parametrize("variant", ["RN18", "RN50x64", "rn50", "RN"])
def test_resnet_size_rejects_unknown_variant(variant):
    with pytest.raises(ValueError, match=r"Unknown ResNet variant .* RN50, RN101, RN50x4, RN50x16"):
        resnet_size(variant)


def test_rn50_parameter_count_matches_clip():
    # OpenAI CLIP RN50: visual 38,316,896 parameters, 102,007,137 in total, as printed by
    # sum(p.numel() for p in model.parameters()) on clip.load("RN50") (open_clip's
    # docs/model_profile.csv: 38.32M image, 102.01M total). The same numbers follow by hand from
    # CLIP's model.py. Its 53,248 BatchNorm running means and variances are buffers, not
    # parameters; here they are batch_stats.
    variables = jax.eval_shape(ModifiedResNet("RN50").init, jax.random.key(0), images(1, 224))
    assert count(variables["params"]) == 38_316_896
    assert count(variables["batch_stats"]) == 53_248


def test_two_tower_rn50_parameter_count():
    config = base_config().model  # text 512 wide, 12 layers, 8 heads, context 77, vocab 49,408
    config.embed_dim = 1024
    config.image.variant = "RN50"
    model = TwoTower.from_config(config)
    tokens = jnp.zeros((1, 77), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images(1, 224), tokens)
    # CLIP's total 102,007,137 (see above), plus clipjax's image_projection 1024 x 1024 on top of
    # the attention pool's output (CLIP's attention pool maps straight to embed_dim).
    assert count(variables["params"]) == 102_007_137 + 1024 * 1024


def test_output_shape_and_width_override():
    variables = jax.eval_shape(TINY.init, jax.random.key(0), images(2, 64))
    params = nn.unbox(variables)["params"]
    assert params["stem_conv1"]["kernel"].shape == (3, 3, 3, 4)
    assert params["stage4_block_02"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert params["attn_pool"]["pos_embed"].shape == (2 * 2 + 1, 256)
    assert params["attn_pool"]["query"]["kernel"].shape == (256, 4, 64)
    assert [name for name in params if name.startswith("stage3")] == [
        f"stage3_block_{i:02d}" for i in range(6)
    ]
    out = jax.eval_shape(TINY.apply, variables, images(2, 64))
    assert out.shape == (2, 1024)


def test_train_updates_batch_stats_and_eval_leaves_them(tiny_variables):
    x = images()
    apply = jax.jit(TINY.apply, static_argnames=("train", "mutable", "capture_intermediates"))
    stats = tiny_variables["batch_stats"]

    out_eval, updates = apply(tiny_variables, x, train=False, mutable=("batch_stats",))
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], stats)

    out_train, updates = apply(
        tiny_variables,
        x,
        train=True,
        mutable=("batch_stats", "intermediates"),
        capture_intermediates=lambda module, _: module.name == "stem_conv1",
    )
    assert out_eval.shape == out_train.shape == (4, 1024)
    assert not np.allclose(out_train, out_eval, atol=1e-3)  # batch vs running statistics
    for old, new in zip(
        jax.tree.leaves(stats), jax.tree.leaves(updates["batch_stats"]), strict=True
    ):
        assert not np.allclose(old, new)
    # Momentum 0.9 from the initial (mean 0, var 1): new = 0.1 * batch statistic (+ 0.9).
    conv = updates["intermediates"]["stem_conv1"]["__call__"][0]
    bn = updates["batch_stats"]["stem_bn1"]
    np.testing.assert_allclose(bn["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn["var"], 0.9 + 0.1 * conv.var((0, 1, 2)), rtol=1e-4)


def test_rejects_image_size_not_a_multiple_of_32():
    with pytest.raises(ValueError, match=r"model\.image\.size=48x48 is not a multiple of 32"):
        jax.eval_shape(TINY.init, jax.random.key(0), images(1, 48))


def test_rejects_odd_width():
    with pytest.raises(ValueError, match=r"model\.image\.width=7"):
        jax.eval_shape(ModifiedResNet("RN50", width=7).init, jax.random.key(0), images(1, 32))


def test_every_parameter_has_logical_names_known_to_the_rules():
    boxed = jax.eval_shape(TINY.init, jax.random.key(0), images(1))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    names = set()
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
        names.update(name for name in leaf.names if name is not None)
    assert names == {"conv_in", "conv_out", "embed", "heads", "kv"}
    assert names <= set(dict(RULES))
    specs = nn.get_partition_spec(boxed)  # batch_stats: unannotated, so replicated
    assert specs["params"]["stem_conv2"]["kernel"] == jax.sharding.PartitionSpec(
        None, None, "conv_in", "conv_out"
    )
    assert specs["batch_stats"]["stem_bn2"]["mean"] == jax.sharding.PartitionSpec()


def test_sharded_over_a_mesh_matches_unsharded(tiny_variables):
    x = images()
    expected = jax.jit(TINY.apply)(tiny_variables, x)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "model": 2}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        specs = nn.get_partition_spec(jax.eval_shape(TINY.init, jax.random.key(0), x))
        shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
        variables = jax.device_put(tiny_variables, shardings)
        kernel = variables["params"]["stage2_block_00"]["conv2"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
        query = variables["params"]["attn_pool"]["query"]["kernel"]
        assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
        out = jax.jit(TINY.apply)(variables, jax.device_put(x, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_two_tower_dispatches_on_the_variant_and_passes_train(tiny_two_tower):
    variables = tiny_two_tower
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(TINY_TWO_TOWER.bind(variables).image_tower, ModifiedResNet)
    out, updates = jax.jit(
        lambda v: TINY_TWO_TOWER.apply(v, images(), tokens(), train=True, mutable=("batch_stats",))
    )(variables)
    assert out["image"]["features"].shape == (4, 1024)
    assert out["image"]["embed"].shape == out["text"]["embed"].shape == (4, 32)
    assert not np.allclose(
        updates["batch_stats"]["image_tower"]["stem_bn1"]["mean"],
        variables["batch_stats"]["image_tower"]["stem_bn1"]["mean"],
    )
