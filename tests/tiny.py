"""Configs shrunk to test size: every `:local` config, with a model that compiles in seconds."""

import contextlib
import importlib
import os

import flax.linen as nn
import jax

from clipjax import bench, sharding, step


def tiny_config(config_name: str = "clip_vitb32"):
    c = importlib.import_module(f"configs.{config_name}").get_config("local")
    c.batch_size = 16
    c.model.embed_dim = 16
    c.model.image.size = 32 if c.model.image.variant.startswith("RN") else 16
    c.model.image.depth = 1
    c.model.text.width = 32
    c.model.text.depth = 1
    c.model.text.heads = 2
    c.model.text.context_length = 16
    c.data.num_workers = 0
    for settings in c.evals.values():
        settings.num_examples = 32
        settings.batch_size = 16
    c.evals.shapes_probe.train_source = "shapes:64?seed=1"
    c.evals.shapes_probe.steps = 50
    if c.objective in ("slip",):
        c.slip.head_width, c.slip.head_dim = 32, 16
    if c.objective in ("filip", "defilip"):
        c.filip.dim, c.filip.top_k = 16, 4
    if c.objective in ("declip", "defilip"):
        c.declip.nns_weight = 0.2  # every DeCLIP term trains in the tests (`:local` drops NNS)
    return c


@contextlib.contextmanager
def built(config):
    """Inside the mesh and logical rules: (objective, initial state, jitted step, a synthetic
    batch of the config's shapes)."""
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, init, _, step_fn = step.build(config, mesh)
        batch = bench.synthetic_batch(config, mesh, objective.views)
        yield objective, init(jax.random.PRNGKey(0)), step_fn, batch


def one_device_env() -> dict:
    """The environment for a subprocess on one CPU device: the session's XLA_FLAGS (see
    `conftest.py`) without its 8 fake devices."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    kept = [flag for flag in flags if not flag.startswith("--xla_force_host_platform_device")]
    return {**os.environ, "XLA_FLAGS": " ".join(kept)}
