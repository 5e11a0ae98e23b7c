"""The learning-rate schedule and the optimizers: AdamW, and SGD + Lookahead (CLIP-Lite)."""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up from `optim.warmup_from` to `optim.lr`, then cosine decay to 0 at
    `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        optim.warmup_from, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1)
    )


class LookaheadState(NamedTuple):
    fast: optax.OptState  # the inner optimizer's state
    slow: optax.Params  # the slow weights
    count: jax.Array  # inner steps taken


def lookahead(inner: optax.GradientTransformation, sync_period: int, alpha: float):
    """Lookahead (Zhang et al. 2019) on plain parameters.

    The inner optimizer moves the (fast) parameters; every `sync_period` steps the slow weights
    move `alpha` of the way towards them and the fast weights restart from there. Unlike
    `optax.lookahead`, parameters stay a plain pytree: the slow weights live in the state.
    """

    def init(params):
        return LookaheadState(inner.init(params), params, jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        updates, fast_state = inner.update(updates, state.fast, params)
        fast = optax.apply_updates(params, updates)
        count = state.count + 1
        sync = count % sync_period == 0
        slow = jax.tree.map(lambda s, f: jnp.where(sync, s + alpha * (f - s), s), state.slow, fast)
        new_params = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
        updates = jax.tree.map(jnp.subtract, new_params, params)
        return updates, LookaheadState(fast_state, slow, count)

    return optax.GradientTransformation(init, update)


OPTIMIZERS = ("adamw", "sgd_lookahead")


def param_names(params) -> list[str]:
    """Each parameter's '/'-joined name (e.g. "image_tower/patch_embed/kernel"), in leaf order;
    alike for plain and for logically boxed parameters."""
    return [
        "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def frozen_mask(params, pattern: str):
    """A pytree of bools like `params`: True where the parameter's name matches `pattern`
    whole (`re.fullmatch`); all False for ""."""
    regex = re.compile(pattern) if pattern else None
    flags = [bool(regex and regex.fullmatch(name)) for name in param_names(params)]
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def frozen_pattern(config) -> str:
    """The regex of the parameters that never change: `config.optim.frozen`, and the towers
    (with their projections) that `config.model.<tower>.locked` locks."""
    parts = [config.optim.frozen] if config.optim.frozen else []
    for tower in ("image", "text"):
        if config.model[tower].locked:
            parts.append(f"{tower}_tower/.*|{tower}_projection/.*")
    return "|".join(f"(?:{part})" for part in parts)


def make_optimizer(
    optim, schedule: optax.Schedule, frozen: str = ""
) -> optax.GradientTransformation:
    """`optim.name`: "adamw", or "sgd_lookahead" (SGD with momentum inside Lookahead).

    Weight decay applies to matrices only: none on biases, norms or the logit scale. The
    parameters whose names match the regex `frozen` (`frozen_mask`) get a zero update and hold
    no optimizer state (no moments), and the gradient clip's norm leaves them out.
    """
    tx = _trainable_optimizer(optim, schedule)
    if not frozen:
        return tx

    def labels(params):
        return jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(params, frozen))

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _trainable_optimizer(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer of the parameters that train (see `make_optimizer`)."""
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)
    if optim.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    elif optim.name == "sgd_lookahead":
        sgd = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=optim.momentum),
        )
        tx = lookahead(sgd, optim.lookahead_steps, optim.lookahead_alpha)
    else:
        raise ValueError(
            f"config.optim.name={optim.name!r} is unknown; use 'adamw' or 'sgd_lookahead'."
        )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    return tx
