"""The checks run before compiling: known fields, values, sources, the workdir, and what a
resumed run may change; loading a saved config."""

import difflib
import importlib.util
import json
import os
import uuid

import ml_collections
from absl import logging

from clipjax import evaluate, objectives, optimizers, paths
from clipjax.config.sections import base_config, eval_settings
from clipjax.data import image_ops, sources
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.errors import ConfigError
from clipjax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from clipjax.models.resnet import resnet_size
from clipjax.models.vit import vit_size

# What a resumed run may change. Fields that only steer the run change freely (one log line);
# the schedule's are the user's call (a warning); every other field fixes the state's shapes,
# the objective or the input order, and a change is refused.
RESUME_STEERING = (
    "total_steps", "log_every", "eval_every", "ckpt_every", "ckpt_every_secs", "keep_ckpts",
    "max_nonfinite_steps", "init_from", "evals", "accum_steps", "data.num_workers",
    "data.device_prefetch", "data.max_skipped_fraction", "data.allow_changed",
    "model.attention", "model.remat",
)  # fmt: skip
RESUME_WARNED = ("optim.lr", "optim.warmup_steps")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(field: str, names) -> bool:
    return any(field == name or field.startswith(name + ".") for name in names)


def resume_changes(saved: dict, new: dict) -> dict[str, list[str]]:
    """The fields whose values differ between a workdir's saved config and a new one (plain
    dicts, as config.json holds them), as "field saved → new", under "steering", "warned" and
    "refused" (see RESUME_STEERING)."""
    saved, new = _flatten(saved), _flatten(new)
    changes = {"steering": [], "warned": [], "refused": []}
    for field in sorted(set(saved) | set(new)):
        if saved.get(field, "absent") == new.get(field, "absent"):
            continue
        if _under(field, RESUME_STEERING):
            kind = "steering"
        elif _under(field, RESUME_WARNED):
            kind = "warned"
        else:
            kind = "refused"
        changes[kind].append(
            f"{field} {saved.get(field, 'absent')!r} → {new.get(field, 'absent')!r}"
        )
    return changes


def check_resume(config, workdir: str) -> None:
    """Before a run resumes in `workdir`: ConfigError, in one line, if `config` changes a field
    that fixes the state, the objective or the input order; log what else changed."""
    path = paths.path(workdir) / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} does not read as JSON ({e}); restore it or use a new --workdir."
        ) from None
    changes = resume_changes(saved, json.loads(config.to_json_best_effort()))
    if changes["refused"]:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with other values of fields that fix its "
            f"state or input order: {'; '.join(changes['refused'])}. Resume with the saved "
            "values (config.json there), use a new --workdir, or start afresh from its weights "
            f"with a new --workdir and --config.init_from={workdir}."
        )
    if changes["steering"]:
        logging.info("Resuming with changed settings: %s", "; ".join(changes["steering"]))
    if changes["warned"]:
        logging.warning(
            "Resuming with a changed learning-rate schedule: %s. The optimizer state was "
            "built under the old one; the run continues on the new.",
            "; ".join(changes["warned"]),
        )


def load_saved(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (its `config.json`), over base_config()."""
    path = paths.path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: --workdir must be a directory clipjax.main trained in, or "
            "pass --config=FILE with the config it was trained with."
        )
    saved = json.loads(path.read_text())
    config = base_config()
    # Every field of each evaluation, so that any can be overridden.
    config.evals = {name: eval_settings(entry) for name, entry in saved.pop("evals", {}).items()}

    def merge(into, values, prefix):
        for key, value in values.items():
            if key not in into:
                raise ConfigError(
                    f"{path}: {prefix}.{key} is not a field of this clipjax version; pass "
                    "--config=FILE instead."
                )
            if isinstance(into[key], ml_collections.ConfigDict):
                merge(into[key], value, f"{prefix}.{key}")
            else:
                into[key] = value

    merge(config, saved, "config")
    return config


def _fields(config, prefix="config") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict) and name != "config.evals":
            out.update(_fields(value, name))
        else:
            out[name] = value
    return out


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {close[0]}?" if close else ""


def _unknown_eval_field(name: str, evals) -> ConfigError | None:
    """For `config.evals.<entry>.<field>`: entries are the config's own, fields their kind's."""
    entry, _, field = name.removeprefix("config.evals.").partition(".")
    if evals is not None and entry not in evals:
        have = ", ".join(sorted(evals)) or "none"
        return ConfigError(
            f"{name}: this config has no evaluation {entry!r} (it has: {have}); add one to "
            "config.evals in a config file."
        )
    if not field:
        return None
    kind = evals[entry].get("kind") if evals is not None else None
    if kind not in evaluate.KINDS:
        if evals is not None:
            return ConfigError(
                f"config.evals.{entry}.kind={kind!r} is not an evaluation kind; use one of "
                f"{', '.join(evaluate.KINDS)}."
            )
        known = {"kind"}.union(*map(evaluate.fields, evaluate.KINDS))  # no config: any kind's
    else:
        known = {"kind", *evaluate.fields(kind)}
    if field in known:
        return None
    what = f"a {kind} evaluation" if kind in evaluate.KINDS else "an evaluation"
    if other_kinds := [k for k in evaluate.KINDS if field in evaluate.fields(k)]:
        hint = f" It is a field of {' and '.join(other_kinds)} evaluations."
    else:
        hint = _did_you_mean(name, [f"config.evals.{entry}.{k}" for k in sorted(known)])
    return ConfigError(f"{name} is not a field of {what}.{hint}")


def unknown_field_error(name: str, config=None) -> ConfigError | None:
    """A ConfigError if `name` ("config.optim.lr") is not a config field, else None.

    Evaluation entries are checked against `config.evals` when `config` is given."""
    if name.startswith("config.evals."):
        return _unknown_eval_field(name, None if config is None else config.evals)
    known = _fields(base_config())
    if name in known:
        return None
    return ConfigError(f"{name} is not a clipjax config field.{_did_you_mean(name, known)}")


def _load_file(spec: str):
    """The config of a `--config=path.py[:arg]` flag value, as config_flags loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_clipjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_file_error(argv: list[str]) -> ConfigError | None:
    """The error for a `--config=path.py[:arg]` that does not load: no such file, or its
    `get_config(arg)` refuses (e.g. a misspelt `:local`)."""
    files = [arg.split("=", 1)[1] for arg in argv[1:] if arg.lstrip("-").startswith("config=")]
    if not files:
        return None
    spec = files[-1]
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        return ConfigError(
            f"--config={spec}: no such file {path!r}; give a config file such as "
            "configs/clip_vitb32.py (add :local for the laptop-sized variant)."
        )
    try:
        _load_file(spec)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported
        kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
        return ConfigError(f"--config={spec}: {kind}{e}")
    return None


def override_error(argv: list[str]) -> ConfigError | None:
    """The error for the first `--config.<field>=...` in `argv` that names no field of the
    `--config` file's config (for one clear line when flag parsing fails)."""
    args = [arg.lstrip("-").split("=", 1) for arg in argv[1:]]
    files = [value for name, *value in args if name == "config" and value]
    config = _load_file(files[-1][0]) if files else None
    for name, *_ in args:
        if name.startswith("config.") and (error := unknown_field_error(name, config)):
            return error
    return None


def _check_known_fields(config) -> None:
    for name in _fields(config):
        if error := unknown_field_error(name, config):
            raise error
    for entry, settings in config.evals.items():
        fields = settings.keys() if isinstance(settings, ml_collections.ConfigDict) else ()
        if "kind" not in fields:
            raise ConfigError(
                f"config.evals.{entry} needs a kind: one of {', '.join(evaluate.KINDS)}, e.g. "
                f"{{'kind': 'zeroshot', 'source': 'folder:/data/imagenet/val'}}."
            )
        for field in fields:
            if error := unknown_field_error(f"config.evals.{entry}.{field}", config):
                raise error


def _check_sources(config) -> None:
    """Every source spec names something that exists (a path, a glob, a TFDS dataset)."""
    specs = [("config.data.train", config.data.train, "train")]
    for entry, settings in sorted(config.evals.items()):
        settings = eval_settings(settings)
        specs.append((f"config.evals.{entry}.source", settings.source, "eval"))
        if settings.kind == "linear_probe":
            field = f"config.evals.{entry}.train_source"
            if not settings.train_source:
                raise ConfigError(
                    f"{field} is empty; name the labelled examples to fit the probe on, e.g. "
                    "'folder:/data/imagenet/train' or 'tfds:cifar10:train'."
                )
            if not 0 < settings.holdout < 1:
                raise ConfigError(
                    f"config.evals.{entry}.holdout={settings.holdout} must be between 0 and 1."
                )
            specs.append((field, settings.train_source, "eval"))
    for field, spec, split in specs:
        try:
            sources.make_source(spec, split)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None


def _check_workdir(workdir: str) -> None:
    probe = paths.path(workdir) / f".writable-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} is not writable ({e.strerror or e}); pass a directory you "
            "can write to."
        ) from None


DTYPES = ("float32", "bfloat16", "float16")


def _check_values(config) -> None:
    """Counts, intervals and names: each one checked against what it may be."""
    at_least = {
        "total_steps": 1,
        "log_every": 1,
        "eval_every": 1,
        "ckpt_every": 1,
        "keep_ckpts": 1,
        "max_nonfinite_steps": 1,
        "ckpt_every_secs": 0,
        "data.num_workers": 0,
        "data.device_prefetch": 0,
        "accum_steps": 1,
    }
    for name, low in at_least.items():
        value = config
        for part in name.split("."):
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            raise ConfigError(f"config.{name}={value!r} must be a number, at least {low}.")
    names = {
        "objective": (config.objective, sorted(objectives.OBJECTIVES)),
        "optim.name": (config.optim.name, optimizers.OPTIMIZERS),
        "model.dtype": (config.model.dtype, DTYPES),
        "model.remat": (config.model.remat, tuple(REMAT_POLICIES)),
        "model.attention": (config.model.attention, ATTENTION_IMPLEMENTATIONS),
    }
    for name, (value, known) in names.items():
        if value not in known:
            close = difflib.get_close_matches(str(value), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config.{name}={value!r} is unknown; use one of {', '.join(known)}.{hint}"
            )
    dropout = config.model.image.patch_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(
            f"config.model.image.patch_dropout={dropout!r} must be in [0, 1): the fraction of "
            "patch tokens dropped in training (FLIP used 0.5 and 0.75)."
        )
    if dropout and config.model.image.variant.startswith("RN"):
        raise ConfigError(
            f"config.model.image.patch_dropout={dropout} needs a ViT image tower; "
            f"{config.model.image.variant!r} is a ResNet, which has no patch tokens."
        )
    if config.model.attention == "cudnn" and config.model.dtype == "float32":
        raise ConfigError(
            "config.model.attention='cudnn' needs 16-bit operands: set config.model.dtype="
            "'bfloat16', or config.model.attention='auto'."
        )


def validate(config, workdir: str, data_parallel: int) -> None:
    """Raise ConfigError naming the field and the fix; run before anything compiles."""
    _check_known_fields(config)
    _check_values(config)
    if config.batch_size % data_parallel:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split over the {data_parallel} "
            f"data-parallel devices; use a multiple of {data_parallel}."
        )
    per_device = config.batch_size // data_parallel
    if per_device % config.accum_steps:
        raise ConfigError(
            f"config.accum_steps={config.accum_steps} does not divide the {per_device} examples "
            f"each of the {data_parallel} data-parallel devices holds (config.batch_size="
            f"{config.batch_size}); use a divisor of {per_device}."
        )
    image = config.model.image
    try:
        if image.variant.startswith("RN"):
            resnet_size(image.variant)
            patch = 32  # the ResNet downsamples by 32
        else:
            patch = vit_size(image.variant)[-1]
    except ValueError as e:
        raise ConfigError(f"config.model.image.variant: {e}") from None
    if image.size % patch:
        kind = "patch size" if not image.variant.startswith("RN") else "downsampling factor"
        raise ConfigError(
            f"config.model.image.size={image.size} is not divisible by the {kind} {patch} of "
            f"variant {image.variant!r}; use a multiple of {patch}."
        )
    try:
        image_ops.Augment(**config.data.augment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_sources(config)
    if path := config.data.tokenizer.path:
        try:
            tokenizer_lib.load(path)
        except ValueError as e:
            raise ConfigError(f"config.data.tokenizer.path: {e}") from None
    if config.init_from and not os.path.isdir(config.init_from):
        raise ConfigError(
            f"config.init_from={config.init_from!r} is not a folder: name a clipjax workdir, "
            "a clipjax export or an open_clip local-dir folder."
        )
    _check_workdir(workdir)
