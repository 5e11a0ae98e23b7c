"""clipjax parameters ↔ open_clip `CLIP` state_dicts, and clipjax `config.model` ↔ open_clip's
`model_cfg`: the two halves of weight export and import.

Tensors are mapped by name, with open_clip's (torch) layouts: linear weights are (out, in),
convolutions (out, in, kh, kw); q, k and v are one `in_proj_weight`. open_clip's ResNet has no
projection after its attention pool (the pool's `c_proj` gives the embedding), so clipjax's
`image_projection` is folded into `c_proj` on export and imported as the identity.

Everything here is numpy: no torch, no open_clip.
"""

import dataclasses
import math
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax import sharding
from clipjax.errors import ConfigError
from clipjax.models.resnet import RESNET_SIZES, resnet_size
from clipjax.models.two_tower import IMAGE_MEAN, IMAGE_STD
from clipjax.models.vit import VIT_SIZES, vit_size


class WeightsError(ConfigError):
    """A state_dict or model_cfg that does not fit; the message names the tensor or field."""


# ------------------------------------------------------------------------------ tensor rules


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One open_clip tensor and the clipjax leaves it is made of (paths "params/a/b/kernel")."""

    name: str
    paths: tuple[str, ...]
    to_torch: Callable[[list[np.ndarray]], np.ndarray]
    # (tensor, the leaves' shapes) -> the leaves
    from_torch: Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]


def _same_to(arrays):
    return arrays[0]


def _same_from(tensor, shapes):
    if tensor.shape != shapes[0]:
        raise ValueError
    return [tensor]


def _vector_to(arrays):
    return jnp.concatenate([a.reshape(-1) for a in arrays])


def _vector_from(tensor, shapes):
    sizes = [math.prod(s) for s in shapes]
    if tensor.shape != (sum(sizes),):
        raise ValueError
    parts = np.split(tensor, np.cumsum(sizes)[:-1])
    return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]


def _matrix(n_in: int):
    """Kernels whose first `n_in` axes are inputs ↔ torch (out, in), stacked along out."""

    def to_torch(arrays):
        return jnp.concatenate([a.reshape(math.prod(a.shape[:n_in]), -1).T for a in arrays])

    def from_torch(tensor, shapes):
        outs = [math.prod(s[n_in:]) for s in shapes]
        if tensor.shape != (sum(outs), math.prod(shapes[0][:n_in])):
            raise ValueError
        parts = np.split(tensor, np.cumsum(outs)[:-1])
        return [p.T.reshape(s) for p, s in zip(parts, shapes, strict=True)]

    return to_torch, from_torch


def _conv_to(arrays):
    return arrays[0].transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


def _conv_from(tensor, shapes):
    kernel = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor
    if kernel.shape != shapes[0]:
        raise ValueError
    return [kernel]


def _fold_to(arrays):
    """c_proj of open_clip's attention pool: clipjax's out projection then image_projection."""
    out, projection = arrays  # out: (heads, head_dim, d) kernel or (d,) bias; (d, embed)
    if out.ndim == 1:
        return out @ projection
    return (out.reshape(-1, out.shape[-1]) @ projection).T


def _fold_from(tensor, shapes):
    out_shape, projection_shape = shapes
    embed = projection_shape[1]
    want = (embed,) if len(out_shape) == 1 else (embed, math.prod(out_shape[:-1]))
    if tensor.shape != want or projection_shape != (out_shape[-1], embed):
        raise ValueError
    out = tensor if len(out_shape) == 1 else tensor.T.reshape(out_shape)
    return [out.reshape(out_shape), np.eye(embed, dtype=tensor.dtype)]


SAME = (_same_to, _same_from)  # the same layout
VECTOR = (_vector_to, _vector_from)  # biases: leaves flattened and concatenated
LINEAR = _matrix(1)
CONV = (_conv_to, _conv_from)


def _rule(name, paths, kind) -> _Rule:
    return _Rule(name, tuple(paths), *kind)


def _layer_norm(torch_prefix, path) -> list[_Rule]:
    return [
        _rule(f"{torch_prefix}.weight", [f"params/{path}/scale"], SAME),
        _rule(f"{torch_prefix}.bias", [f"params/{path}/bias"], SAME),
    ]


def _batch_norm(torch_prefix, path) -> list[_Rule]:
    return [
        _rule(f"{torch_prefix}.weight", [f"params/{path}/scale"], SAME),
        _rule(f"{torch_prefix}.bias", [f"params/{path}/bias"], SAME),
        _rule(f"{torch_prefix}.running_mean", [f"batch_stats/{path}/mean"], SAME),
        _rule(f"{torch_prefix}.running_var", [f"batch_stats/{path}/var"], SAME),
    ]


def _transformer(torch_prefix, path, depth) -> list[_Rule]:
    rules = []
    for i in range(depth):
        t, p = f"{torch_prefix}.resblocks.{i}", f"{path}/block_{i:02d}"
        qkv = [f"params/{p}/attn/{n}" for n in ("query", "key", "value")]
        rules += [
            *_layer_norm(f"{t}.ln_1", f"{p}/ln_attn"),
            _rule(f"{t}.attn.in_proj_weight", [f"{q}/kernel" for q in qkv], LINEAR),
            _rule(f"{t}.attn.in_proj_bias", [f"{q}/bias" for q in qkv], VECTOR),
            _rule(f"{t}.attn.out_proj.weight", [f"params/{p}/attn/out/kernel"], _matrix(2)),
            _rule(f"{t}.attn.out_proj.bias", [f"params/{p}/attn/out/bias"], SAME),
            *_layer_norm(f"{t}.ln_2", f"{p}/ln_mlp"),
        ]
        for torch_name, name in (("c_fc", "fc_in"), ("c_proj", "fc_out")):
            rules += [
                _rule(f"{t}.mlp.{torch_name}.weight", [f"params/{p}/mlp/{name}/kernel"], LINEAR),
                _rule(f"{t}.mlp.{torch_name}.bias", [f"params/{p}/mlp/{name}/bias"], SAME),
            ]
    return rules


def _vit(depth) -> list[_Rule]:
    tower = "image_tower"
    return [
        _rule("visual.conv1.weight", [f"params/{tower}/patch_embed/kernel"], CONV),
        _rule("visual.class_embedding", [f"params/{tower}/class_token"], SAME),
        _rule("visual.positional_embedding", [f"params/{tower}/pos_embed"], SAME),
        *_layer_norm("visual.ln_pre", f"{tower}/ln_pre"),
        *_transformer("visual.transformer", f"{tower}/transformer", depth),
        *_layer_norm("visual.ln_post", f"{tower}/ln_post"),
        _rule("visual.proj", ["params/image_projection/kernel"], SAME),
    ]


def _resnet(layers) -> list[_Rule]:
    tower = "image_tower"
    rules = []
    for i in (1, 2, 3):
        rules.append(_rule(f"visual.conv{i}.weight", [f"params/{tower}/stem_conv{i}/kernel"], CONV))
        rules += _batch_norm(f"visual.bn{i}", f"{tower}/stem_bn{i}")
    for stage, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            t, p = f"visual.layer{stage}.{block}", f"{tower}/stage{stage}_block_{block:02d}"
            for i in (1, 2, 3):
                rules.append(_rule(f"{t}.conv{i}.weight", [f"params/{p}/conv{i}/kernel"], CONV))
                rules += _batch_norm(f"{t}.bn{i}", f"{p}/bn{i}")
            if block == 0:  # every stage's first block changes the channels
                conv = [f"params/{p}/downsample_conv/kernel"]
                rules.append(_rule(f"{t}.downsample.0.weight", conv, CONV))
                rules += _batch_norm(f"{t}.downsample.1", f"{p}/downsample_bn")
    pool, projection = f"params/{tower}/attn_pool", "params/image_projection/kernel"
    rules.append(_rule("visual.attnpool.positional_embedding", [f"{pool}/pos_embed"], SAME))
    for torch_name, name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [
            _rule(f"visual.attnpool.{torch_name}_proj.weight", [f"{pool}/{name}/kernel"], LINEAR),
            _rule(f"visual.attnpool.{torch_name}_proj.bias", [f"{pool}/{name}/bias"], VECTOR),
        ]
    fold = (_fold_to, _fold_from)
    rules += [
        _rule("visual.attnpool.c_proj.weight", [f"{pool}/out/kernel", projection], fold),
        _rule("visual.attnpool.c_proj.bias", [f"{pool}/out/bias", projection], fold),
    ]
    return rules


def rules(model) -> list[_Rule]:
    """Every open_clip tensor of `model` (a TwoTower) and the clipjax leaves it maps to."""
    if model.projection != "linear":
        raise WeightsError(
            f"model.projection={model.projection!r} (CLIP-Lite's MI blocks) has no open_clip "
            "form: open_clip's CLIP projects each tower with one matrix. Use clipjax.load on the "
            "workdir instead."
        )
    if model.image_variant.startswith("RN"):
        image = _resnet(resnet_size(model.image_variant)[0])
    else:
        depth = model.image_depth if model.image_depth != -1 else vit_size(model.image_variant)[1]
        image = _vit(depth)
    text = [
        _rule("token_embedding.weight", ["params/text_tower/token_embed/embedding"], SAME),
        _rule("positional_embedding", ["params/text_tower/pos_embed"], SAME),
        *_transformer("transformer", "text_tower/transformer", model.text_depth),
        *_layer_norm("ln_final", "text_tower/ln_final"),
        _rule("text_projection", ["params/text_projection/kernel"], SAME),
    ]
    scales = [_rule("logit_scale", ["params/log_scale"], SAME)]
    if model.bias_init is not None:
        scales.append(_rule("logit_bias", ["params/bias"], SAME))
    return image + text + scales


# BatchNorm step counters: open_clip's state_dict has them; clipjax does not use them.
_COUNTER = ".num_batches_tracked"


def flatten(variables) -> dict:
    """{"params": ..., "batch_stats": ...} -> {"params/a/b/kernel": leaf}."""
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")


def abstract_leaves(model, model_config) -> dict:
    """`model`'s flat variables as ShapeDtypeStructs, for inputs of `model_config`'s sizes;
    nothing is compiled or allocated, and no sharding applies (even inside a mesh)."""
    size, length = model_config.image.size, model_config.text.context_length
    with nn.logical_axis_rules(()):
        shapes = jax.eval_shape(
            model.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, size, size, 3)),
            jnp.zeros((1, length), jnp.int32),
        )
    return flatten(sharding.unboxed(shapes))


_SCANNED = "/transformer/blocks/"  # model.scan_layers: one module, depth-first leaves


def _block_paths(scanned_path: str, depth: int) -> list[str]:
    """The per-block paths (`.../transformer/block_00/x`, ...) of a scanned leaf's path."""
    head, tail = scanned_path.split(_SCANNED)
    return [f"{head}/transformer/block_{i:02d}/{tail}" for i in range(depth)]


def _unscan(flat: dict) -> dict:
    """Flat leaves with every scanned tower's stacked block leaves (`.../transformer/blocks/x`,
    depth first) split into the per-block leaves `rules` names (`.../transformer/block_00/x`,
    ...); jax-traceable."""
    out = {}
    for path, leaf in flat.items():
        if _SCANNED not in path:
            out[path] = leaf
            continue
        for i, block in enumerate(_block_paths(path, leaf.shape[0])):
            out[block] = leaf[i]
    return out


def _rescan(leaves: dict, like: dict) -> dict:
    """Per-block `leaves` stacked into the scanned leaves of `like` (the inverse of `_unscan`)."""
    out = dict(leaves)
    for path, leaf in like.items():
        if _SCANNED in path:
            out[path] = np.stack([out.pop(block) for block in _block_paths(path, leaf.shape[0])])
    return out


def _tensors(flat: dict, model) -> dict:
    """open_clip's tensors (the BatchNorm counters aside) from flat clipjax leaves, scanned
    or not; jax-traceable, so `jax.eval_shape` gives the shapes of a model too big to build."""
    flat = _unscan(flat)
    return {rule.name: rule.to_torch([flat[path] for path in rule.paths]) for rule in rules(model)}


def _with_counters(tensors: dict, counter) -> dict:
    out = {}
    for name, tensor in tensors.items():
        out[name] = tensor
        if name.endswith(".running_var"):
            out[name.removesuffix(".running_var") + _COUNTER] = counter
    return out


def to_state_dict(variables, model) -> dict[str, np.ndarray]:
    """clipjax variables (params and batch_stats) -> open_clip's state_dict, float32.

    Leaves that open_clip has no place for (objective heads: SimSiam, masked LM, priors) are
    left out."""
    flat = {path: jnp.asarray(leaf, jnp.float32) for path, leaf in flatten(variables).items()}
    tensors = {name: np.array(tensor) for name, tensor in _tensors(flat, model).items()}
    return _with_counters(tensors, np.zeros((), np.int64))


def state_dict_shapes(model, like: dict) -> dict[str, tuple[int, ...]]:
    """The shapes `to_state_dict` gives for `model` whose flat variables are shaped as `like`
    (ShapeDtypeStructs): nothing is allocated."""
    shapes = jax.eval_shape(lambda flat: _tensors(flat, model), like)
    return _with_counters({name: tuple(s.shape) for name, s in shapes.items()}, ())


def from_state_dict(state_dict: dict, model, like: dict, source: str) -> dict[str, np.ndarray]:
    """open_clip's state_dict -> clipjax leaves {path: float32 array} shaped as `like` (the
    flattened variables of `model`, or their ShapeDtypeStructs). Leaves with no open_clip
    tensor (objective heads) are not in the result. A missing, extra or mis-shaped tensor
    raises WeightsError naming it."""
    scanned_like, like = like, jax.eval_shape(_unscan, like)
    known, leaves = set(), {}
    for rule in rules(model):
        known.add(rule.name)
        if rule.name not in state_dict:
            raise WeightsError(f"{source}: tensor {rule.name!r} is missing.")
        tensor = np.asarray(state_dict[rule.name], np.float32)
        shapes = [tuple(like[path].shape) for path in rule.paths]
        try:
            arrays = rule.from_torch(tensor, shapes)
        except ValueError:
            want = rule.to_torch([np.zeros(s, np.float32) for s in shapes]).shape
            raise WeightsError(
                f"{source}: tensor {rule.name!r} has shape {tuple(tensor.shape)}; the model "
                f"described by its config needs {tuple(want)}."
            ) from None
        for path, array in zip(rule.paths, arrays, strict=True):
            leaves[path] = array
    extra = sorted(name for name in state_dict if name not in known and not name.endswith(_COUNTER))
    if extra:
        raise WeightsError(
            f"{source}: tensor {extra[0]!r} has no place in the model its config describes"
            + (f" (and {len(extra) - 1} more)." if len(extra) > 1 else ".")
        )
    return _rescan(leaves, scanned_like)


# ----------------------------------------------------------------------------- model configs


def open_clip_config(config, eos_id: int, pad_id: int) -> dict:
    """open_clip_config.json's content for clipjax `config`: model_cfg and preprocess_cfg."""
    model, image, text = config.model, config.model.image, config.model.text
    if image.variant.startswith("RN"):
        layers, width, _, _, _ = resnet_size(image.variant)
        vision = {
            "image_size": image.size,
            "layers": list(layers),
            "width": image.width if image.width != -1 else width,
        }
    else:
        width, depth, mlp_dim, heads, patch = vit_size(image.variant)
        vision = {
            "image_size": image.size,
            "layers": image.depth if image.depth != -1 else depth,
            "width": width,
            "patch_size": patch,
            "head_width": width // heads,
            "mlp_ratio": mlp_dim / width,
        }
    model_cfg = {
        "embed_dim": model.embed_dim,
        "quick_gelu": bool(model.quick_gelu),
        "vision_cfg": vision,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.depth,
            # clipjax pools at the end-of-text token: 'eos' finds it for any vocabulary.
            "pool_type": "eos",
            "eos_id": int(eos_id),
            "pad_id": int(pad_id),
        },
    }
    if config.objective == "siglip":
        model_cfg["init_logit_bias"] = -10.0  # the tensor's value comes from the weights
    preprocess_cfg = {
        "size": image.size,
        "mean": [round(float(m), 8) for m in IMAGE_MEAN],
        "std": [round(float(s), 8) for s in IMAGE_STD],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# model_cfg fields of towers clipjax does not have; any of them set means "cannot import".
_UNSUPPORTED = {
    "vision_cfg": ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre"),
    "text_cfg": ("hf_model_name", "ls_init_value", "proj_bias", "no_causal_mask"),
}


def model_config_from_open_clip(model_cfg: dict, source: str) -> dict:
    """open_clip's model_cfg -> clipjax `config.model` fields (a nested dict) and whether the
    model has a logit bias: {"model": {...}, "logit_bias": bool}."""
    try:
        vision, text, embed_dim = (
            model_cfg["vision_cfg"],
            model_cfg["text_cfg"],
            model_cfg["embed_dim"],
        )
    except KeyError as e:
        raise WeightsError(f"{source}: model_cfg has no {e.args[0]!r}.") from None
    for part, fields in _UNSUPPORTED.items():
        for field in fields:
            if model_cfg[part].get(field):
                raise WeightsError(
                    f"{source}: model_cfg.{part}.{field}={model_cfg[part][field]!r} is a tower "
                    "clipjax does not have; clipjax imports open_clip's own ViT, modified "
                    "ResNet and text transformer."
                )
    if model_cfg.get("custom_text") or model_cfg.get("multimodal_cfg"):
        raise WeightsError(
            f"{source}: a custom-text or CoCa model_cfg; clipjax imports open_clip's CLIP class."
        )
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise WeightsError(f"{source}: image_size={image_size} is not square.")
        image_size = image_size[0]
    image = {"size": int(image_size), "depth": -1, "width": -1, "output_dim": -1}
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        by_layers = {sizes[0]: name for name, sizes in RESNET_SIZES.items()}
        if tuple(layers) not in by_layers:
            raise WeightsError(
                f"{source}: vision_cfg.layers={list(layers)} is no clipjax ResNet; clipjax has "
                + ", ".join(f"{n} {list(s[0])}" for n, s in RESNET_SIZES.items())
                + "."
            )
        image.update(
            variant=by_layers[tuple(layers)],
            width=int(vision.get("width", 64)),
            output_dim=int(embed_dim),
        )
    else:
        width = int(vision.get("width", 768))
        heads = width // int(vision.get("head_width", 64))
        mlp_dim = int(round(width * float(vision.get("mlp_ratio", 4.0))))
        sizes = {(w, m, h): name for name, (w, _, m, h) in VIT_SIZES.items()}
        if (width, mlp_dim, heads) not in sizes:
            raise WeightsError(
                f"{source}: a ViT of width {width}, {heads} heads and MLP {mlp_dim} is no "
                "clipjax ViT size; clipjax has "
                + ", ".join(
                    f"{n} ({w}, {h} heads, MLP {m})" for n, (w, _, m, h) in VIT_SIZES.items()
                )
                + "."
            )
        image.update(
            variant=f"{sizes[width, mlp_dim, heads]}/{int(vision.get('patch_size', 16))}",
            depth=int(layers),
        )
    pool_type = text.get("pool_type", "argmax")
    if pool_type not in ("argmax", "eos"):
        raise WeightsError(
            f"{source}: text_cfg.pool_type={pool_type!r}; clipjax pools at the end-of-text "
            "token, which open_clip's 'argmax' and 'eos' pick."
        )
    if int(text.get("pad_id", 0)) != 0:
        raise WeightsError(f"{source}: text_cfg.pad_id={text['pad_id']}; clipjax pads with 0.")
    return {
        "model": {
            "embed_dim": int(embed_dim),
            "projection": "linear",
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "image": image,
            "text": {
                "width": int(text.get("width", 512)),
                "depth": int(text.get("layers", 12)),
                "heads": int(text.get("heads", 8)),
                "context_length": int(text.get("context_length", 77)),
                "vocab_size": int(text.get("vocab_size", 49408)),
            },
        },
        "logit_bias": model_cfg.get("init_logit_bias") is not None,
    }
