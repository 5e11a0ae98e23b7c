"""The contrastive losses' scratch memory per device, compiled for abstract inputs on the
config's mesh (`clipjax.bench --loss_only`): each loss's value and gradients with respect to its
embeddings (or FILIP's tokens), all-gather form against ring form, beside the floors of their
similarity matrices."""

import functools

import jax
import jax.numpy as jnp

from clipjax import losses, sharding
from clipjax.models.vit import vit_size

# name -> (loss body, its replicated scalar arguments: scale, and bias for the sigmoid)
LOSSES = {
    "clip_allgather": (losses.clip_loss, (10.0,)),
    "clip_ring": (losses.clip_loss_ring, (10.0,)),
    "sigmoid_allgather": (losses.sigmoid_loss, (10.0, -10.0)),
    "sigmoid_ring": (losses.sigmoid_loss_ring, (10.0, -10.0)),
    "nt_xent_allgather": (losses.nt_xent_loss, (0.1,)),
    "nt_xent_ring": (losses.nt_xent_loss_ring, (0.1,)),
}
TOKEN_LOSSES = {"filip_allgather": losses.filip_loss, "filip_ring": losses.filip_loss_ring}


def token_loss_memory(config, mesh, batch_sizes: list[int]) -> dict:
    """FILIP's token-wise loss: temp_bytes_per_device of its value and token gradients, per
    global batch, at the config's patch and text token counts and `filip.dim`/`filip.top_k`,
    next to its similarity floors (B/k)·B·T·top_k·4 (all-gather) and (B/k)²·T·top_k·4 (ring),
    T the larger token count."""
    k = sharding.data_parallel_size(mesh)
    patches = (config.model.image.size // vit_size(config.model.image.variant)[4]) ** 2
    length, dim, top_k = config.model.text.context_length, config.filip.dim, config.filip.top_k
    tokens = max(patches, length) * min(top_k, patches, length)
    result = {
        "filip_tokens": {"patches": patches, "text": length, "dim": dim, "top_k": top_k},
        "floor_filip_allgather_bytes": [b // k * b * tokens * 4 for b in batch_sizes],
        "floor_filip_ring_bytes": [(b // k) ** 2 * tokens * 4 for b in batch_sizes],
    }
    batched = sharding.batch_sharding(mesh)
    for name, body in TOKEN_LOSSES.items():
        loss = losses.on_batch_shards(functools.partial(body, top_k=top_k), mesh, num_batched=3)

        def value_and_grads(a, w, m, loss=loss):
            return jax.value_and_grad(lambda a, w: loss(a, w, m, 10.0), argnums=(0, 1))(a, w)

        result[name] = []
        for b in batch_sizes:
            shapes = [
                jax.ShapeDtypeStruct((b, patches, dim), jnp.float32, sharding=batched),
                jax.ShapeDtypeStruct((b, length, dim), jnp.float32, sharding=batched),
                jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=batched),
            ]
            compiled = jax.jit(value_and_grads).lower(*shapes).compile()
            result[name].append(compiled.memory_analysis().temp_size_in_bytes)
    return result


def loss_memory(config, batch_sizes: list[int]) -> dict:
    """temp_bytes_per_device of each loss's value and embedding gradients, per global batch."""
    mesh = sharding.make_mesh(config.mesh)
    k = sharding.data_parallel_size(mesh)
    dim = config.model.embed_dim
    result = {"devices": k, "embed_dim": dim, "batch_sizes": batch_sizes}
    result["floor_allgather_bytes"] = [b // k * b * 4 for b in batch_sizes]
    result["floor_ring_bytes"] = [(b // k) ** 2 * 4 for b in batch_sizes]
    for name, (body, scalars) in LOSSES.items():
        loss = losses.on_batch_shards(body, mesh, num_batched=2)

        def value_and_grads(u, v, loss=loss, scalars=scalars):
            def scalar_loss(u, v):
                out = loss(u, v, *scalars)
                return out[0] if isinstance(out, tuple) else out

            return jax.value_and_grad(scalar_loss, argnums=(0, 1))(u, v)

        result[name] = []
        for b in batch_sizes:
            embeds = jax.ShapeDtypeStruct(
                (b, dim), jnp.float32, sharding=sharding.batch_sharding(mesh)
            )
            compiled = jax.jit(value_and_grads).lower(embeds, embeds).compile()
            result[name].append(compiled.memory_analysis().temp_size_in_bytes)
    if config.objective in ("filip", "defilip"):
        result.update(token_loss_memory(config, mesh, batch_sizes))
    return result
