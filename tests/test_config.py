"""Configs: the B/32 shapes, and one clear error line for each kind of bad input."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from clipjax import config as config_lib
from clipjax import evaluate, sharding, train
from clipjax.models.two_tower import TwoTower
from configs.clip_vitb32 import get_config


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_default_config_is_open_clip_vit_b32():
    c = get_config()
    model = TwoTower.from_config(c.model)
    images = jnp.zeros((1, 224, 224, 3))
    tokens = jnp.zeros((1, 77), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
    assert _count(params) == 151_277_313


def _validate(config, tmp_path, data_parallel=8):
    config_lib.validate(config, str(tmp_path), data_parallel)


def test_local_config_is_valid(tmp_path):
    _validate(get_config("local"), tmp_path)


def test_unknown_field(tmp_path):
    c = get_config("local")
    c.optim.weight_deacy = 1e-3
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        "config.optim.weight_deacy is not a clipjax config field. "
        "Did you mean config.optim.weight_decay?"
    )


def test_batch_not_divisible(tmp_path):
    c = get_config("local")
    c.batch_size = 12
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        "config.batch_size=12 does not split over the 8 data-parallel devices; use a multiple of 8."
    )


def test_image_size_not_divisible_by_patch(tmp_path):
    c = get_config("local")
    c.model.image.size = 30
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        "config.model.image.size=30 is not divisible by the patch size 8 of variant 'Ti/8'; "
        "use a multiple of 8."
    )


def test_unknown_data_source(tmp_path):
    c = get_config("local")
    c.data.train = "parquet:/data/x"
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        "config.data.train: unknown data source 'parquet:/data/x'; known schemes: arrayrecord, "
        "csv, folder, glyphs, mix, shapes, tfds, webdataset (e.g. 'shapes:50000', "
        "'csv:/data/train.csv' or 'arrayrecord:/data/cc3m')."
    )


def test_unknown_augmentation(tmp_path):
    c = get_config("local")
    c.data.augment.recipe = "randaugment"
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        "config.data.augment.recipe='randaugment' is unknown; use one of clip, mocov2."
    )


def test_missing_tokenizer_file(tmp_path):
    c = get_config("local")
    c.data.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == (
        f"config.data.tokenizer.path: no tokenizer at '{tmp_path}/missing.model'. Point it at "
        "an existing sentencepiece .model or OpenAI's bpe_simple_vocab_16e6.txt.gz (or 'openai', "
        "the copy clipjax ships), or set it to '' to train one from the training captions."
    )
    (tmp_path / "broken.model").write_bytes(b"not a model")
    c.data.tokenizer.path = str(tmp_path / "broken.model")
    with pytest.raises(config_lib.ConfigError, match="broken.model does not load as a "):
        _validate(c, tmp_path)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(get_config("local"), str(blocker / "workdir"), 8)
    assert str(e.value) == (
        f"--workdir={blocker}/workdir is not writable (Not a directory); "
        "pass a directory you can write to."
    )


def test_command_line_errors_are_one_line(tmp_path):
    """An unknown override and a bad value each exit with status 2 and one clear line.

    The subprocess inherits conftest's XLA_FLAGS, so it also sees 8 devices.
    """
    base = [
        sys.executable,
        "-m",
        "clipjax.main",
        "--config=configs/clip_vitb32.py:local",
        f"--workdir={tmp_path}",
    ]
    unknown = subprocess.run(
        base + ["--config.optim.warmup_step=10"], capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == (
        "clipjax: --config.optim.warmup_step is not a clipjax config field. "
        "Did you mean config.optim.warmup_steps?"
    )
    odd_batch = subprocess.run(
        base + ["--config.batch_size=100"], capture_output=True, text=True, timeout=120
    )
    assert odd_batch.returncode == 2
    assert odd_batch.stderr.strip().splitlines()[-1] == (
        "clipjax: config.batch_size=100 does not split over the 8 data-parallel devices; "
        "use a multiple of 8."
    )


def _error(config, tmp_path) -> str:
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(config, tmp_path)
    return str(e.value)


def test_evaluation_entries_are_checked_against_their_kind(tmp_path):
    c = get_config("local")
    c.evals.shapes.tempaltes = "clip"
    assert _error(c, tmp_path) == (
        "config.evals.shapes.tempaltes is not a field of a zeroshot evaluation. "
        "Did you mean config.evals.shapes.templates?"
    )
    c = get_config("local")
    c.evals.shapes_retrieval.classes = "imagenet"  # a zeroshot field
    assert _error(c, tmp_path) == (
        "config.evals.shapes_retrieval.classes is not a field of a retrieval evaluation. "
        "It is a field of zeroshot evaluations."
    )
    c = get_config("local")
    c.evals.shapes.kind = "zero_shot"
    assert _error(c, tmp_path) == (
        "config.evals.shapes.kind='zero_shot' is not an evaluation kind; use one of zeroshot, "
        "retrieval, linear_probe."
    )
    c = get_config("local")
    c.evals.imagenet = {"source": "shapes"}
    assert _error(c, tmp_path) == (
        "config.evals.imagenet needs a kind: one of zeroshot, retrieval, linear_probe, e.g. "
        "{'kind': 'zeroshot', 'source': 'folder:/data/imagenet/val'}."
    )
    c = get_config("local")
    c.evals.shapes_probe.train_source = ""
    assert _error(c, tmp_path) == (
        "config.evals.shapes_probe.train_source is empty; name the labelled examples to fit "
        "the probe on, e.g. 'folder:/data/imagenet/train' or 'tfds:cifar10:train'."
    )


def test_eval_settings_fill_the_kinds_defaults():
    settings = config_lib.eval_settings({"kind": "linear_probe", "train_source": "shapes"})
    assert settings.to_dict() == {
        **evaluate.fields("linear_probe"),
        "kind": "linear_probe",
        "train_source": "shapes",
    }


def test_saved_config_round_trips(tmp_path):
    c = get_config("local")
    c.evals.shapes.templates = "clip"
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    assert config_lib.load_saved(str(tmp_path)).to_dict() == c.to_dict()


def test_evaluate_command_line_errors_are_one_line(tmp_path):
    base = [sys.executable, "-m", "clipjax.evaluate", f"--workdir={tmp_path}"]
    no_run = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert no_run.returncode == 2
    assert no_run.stderr.strip().splitlines()[-1] == (
        f"clipjax.evaluate: {tmp_path} has no config.json: --workdir must be a directory "
        "clipjax.main trained in."
    )
    (tmp_path / "config.json").write_text(get_config("local").to_json_best_effort())
    no_eval = subprocess.run(
        base + ["--config.evals.imagenet.source=folder:/data"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_eval.returncode == 2
    assert no_eval.stderr.strip().splitlines()[-1] == (
        "clipjax.evaluate: --config.evals.imagenet.source: this config has no evaluation "
        "'imagenet' (it has: shapes, shapes_probe, shapes_retrieval); add one to config.evals "
        "in a config file."
    )


def test_saved_evaluations_get_every_field_of_their_kind(tmp_path):
    """A config file may give an entry only some fields; the saved config, as the evaluate
    command loads it, has all of them, so that any can be overridden."""
    c = get_config("local")
    c.evals = {"mine": {"kind": "zeroshot", "source": "shapes:64"}}
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    loaded = config_lib.load_saved(str(tmp_path)).evals.mine
    assert loaded.to_dict() == config_lib.eval_entry("zeroshot", source="shapes:64").to_dict()
    assert loaded.templates == evaluate.fields("zeroshot")["templates"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("total_steps", 0, "config.total_steps=0 must be a number, at least 1."),
        ("total_steps", -5, "config.total_steps=-5 must be a number, at least 1."),
        ("log_every", 0, "config.log_every=0 must be a number, at least 1."),
        ("eval_every", 0, "config.eval_every=0 must be a number, at least 1."),
        ("ckpt_every", 0, "config.ckpt_every=0 must be a number, at least 1."),
        ("keep_ckpts", 0, "config.keep_ckpts=0 must be a number, at least 1."),
        ("ckpt_every_secs", -1, "config.ckpt_every_secs=-1.0 must be a number, at least 0."),
        ("data.num_workers", -1, "config.data.num_workers=-1 must be a number, at least 0."),
        (
            "objective",
            "clap",
            "config.objective='clap' is unknown; use one of clip, cliplite, declip, defilip, "
            "filip, siglip, slip. Did you mean 'clip'?",
        ),
        (
            "optim.name",
            "adam",
            "config.optim.name='adam' is unknown; use one of adamw, sgd_lookahead. "
            "Did you mean 'adamw'?",
        ),
        (
            "model.dtype",
            "bf16",
            "config.model.dtype='bf16' is unknown; use one of float32, bfloat16, float16. "
            "Did you mean 'bfloat16'?",
        ),
    ],
)
def test_bad_values_get_one_line(tmp_path, field, value, message):
    c = get_config("local")
    *parents, name = field.split(".")
    node = c
    for parent in parents:
        node = node[parent]
    node[name] = value
    with pytest.raises(config_lib.ConfigError) as e:
        _validate(c, tmp_path)
    assert str(e.value) == message


def test_a_mesh_that_does_not_fit_the_devices():
    c = get_config("local")
    c.mesh.data = 3
    with pytest.raises(config_lib.ConfigError) as e:
        sharding.make_mesh(c.mesh)
    assert str(e.value) == (
        "config.mesh: axis sizes {'data': 3, 'fsdp': 1, 'model': 1} use 3 devices but 8 are "
        "present; set one axis to -1 to take the rest."
    )


@pytest.mark.parametrize(
    "mesh, message",
    [
        (
            {"data": 4, "model": 2},  # the Ti image tower has 3 heads
            "config.mesh: params/image_tower/transformer/block_00/attn/key/bias has 3 'heads' "
            "(dimension 0), which do not split over mesh.model=2; use mesh sizes that divide "
            "it.",
        ),
        (
            {"data": 1, "fsdp": 8},  # every 'embed' dimension splits over fsdp: 64 / 8
            None,
        ),
    ],
)
def test_a_mesh_that_does_not_divide_the_model_is_one_line(mesh, message):
    c = get_config("local")
    c.mesh.update(mesh)
    mesh = sharding.make_mesh(c.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        if message is None:
            train.build(c, mesh)
            return
        with pytest.raises(config_lib.ConfigError) as e:
            train.build(c, mesh)
    assert str(e.value) == message


def _one_line(args, module="clipjax.main", timeout=120):
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, lines[-1]


def test_flag_and_config_file_errors_are_one_line(tmp_path):
    usage = "python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/run"
    local = "--config=configs/clip_vitb32.py:local"
    workdir = f"--workdir={tmp_path}"
    cases = [
        ([], f"clipjax: --config and --workdir must be given, e.g. {usage}"),
        ([local], f"clipjax: --workdir must be given, e.g. {usage}"),
        (
            ["--config=configs/nope.py", workdir],
            "clipjax: --config=configs/nope.py: no such file 'configs/nope.py'; give a config "
            "file such as configs/clip_vitb32.py (add :local for the laptop-sized variant).",
        ),
        (
            ["--config=configs/clip_vitb32.py:lcoal", workdir],
            "clipjax: --config=configs/clip_vitb32.py:lcoal: configs/clip_vitb32.py takes no "
            "argument or 'local', got 'lcoal'.",
        ),
        (
            [local, workdir, "--config.batch_size=abc"],
            "clipjax: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'",
        ),
        (
            [local, workdir, "--config.log_every=0"],
            "clipjax: config.log_every=0 must be a number, at least 1.",
        ),
        (
            [local, workdir, "--distributed", "--coordinator=localhost:8476"],
            "clipjax: --distributed with --coordinator, --num_processes or --process_id needs "
            "all three; --num_processes and --process_id missing (or give none to detect the "
            "cluster).",
        ),
        (
            [local, workdir, "--distributed", "--coordinator=localhost"]
            + ["--num_processes=2", "--process_id=0"],
            "clipjax: --coordinator='localhost' must be HOST:PORT, e.g. localhost:8476.",
        ),
        (
            [local, workdir, "--distributed", "--coordinator=localhost:8476"]
            + ["--num_processes=2", "--process_id=2"],
            "clipjax: --process_id=2 must be in [0, --num_processes=2).",
        ),
    ]
    for args, message in cases:
        assert _one_line(args) == (2, message), args
    assert _one_line([workdir, "--step=abc"], "clipjax.evaluate")[1] == (
        f"clipjax.evaluate: {tmp_path} has no config.json: --workdir must be a directory "
        "clipjax.main trained in."
    )
