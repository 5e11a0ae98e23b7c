"""clipjax ↔ open_clip weights: imported models against open_clip's own embeddings (fixtures
made by tools/make_open_clip_fixtures.py), exported names and shapes against open_clip's
state_dicts, round trips, and every error."""

import importlib
import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from clipjax import config as config_lib
from clipjax import inference, weights
from clipjax.data import shapes
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.models.two_tower import TwoTower

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "open_clip")
MODELS = ("vit", "resnet")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """The fixtures' text towers embed 512 ids; their tokens are given as ids."""
    workdir = str(tmp_path_factory.mktemp("tok"))
    tokenizer_lib.save(
        tokenizer_lib.train(shapes.ShapesSource("train").captions(300), 100), workdir
    )
    return os.path.join(workdir, "tokenizer.model")


def _model_cfg(name):
    with open(os.path.join(FIXTURES, name, "open_clip_config.json")) as f:
        return json.load(f)["model_cfg"]


def _module(name, **fields):
    config = config_lib.base_config()
    config.model.dtype = "float32"  # exact comparisons
    config.model.update(weights.model_config_from_open_clip(_model_cfg(name), "f")["model"])
    config.model.update(fields)
    return TwoTower.from_config(config.model), config


def _init(module, config, seed=0):
    """Random variables of `module`'s shapes (positive BatchNorm variances), without compiling
    its init."""
    rng = np.random.default_rng(seed)
    flat = weights.abstract_leaves(module, config.model)
    return flax.traverse_util.unflatten_dict(
        {
            path: np.abs(value) + 0.5 if path.endswith("/var") else value
            for path, value in (
                (path, rng.normal(0, 0.1, leaf.shape).astype(np.float32))
                for path, leaf in flat.items()
            )
        },
        sep="/",
    )


@pytest.mark.parametrize("name", MODELS)
def test_imported_open_clip_models_give_open_clip_embeddings(name, small_tokenizer):
    model = inference.load(os.path.join(FIXTURES, name), tokenizer=small_tokenizer)
    assert model.config.model.dtype == "float32"  # imports embed in float32, like open_clip
    fixture = np.load(os.path.join(FIXTURES, name, "embeddings.npz"))
    images = model.encode_image(fixture["images"])
    texts = model.encode_text(fixture["tokens"])
    assert np.abs(images - fixture["image_embeds"]).max() <= 1e-5
    assert np.abs(texts - fixture["text_embeds"]).max() <= 1e-5
    np.testing.assert_allclose(model.logit_scale, 1 / 0.07, rtol=1e-3)  # float16-stored
    # The ViT is OpenAI-styled: QuickGELU, and a caption with a 0 ("!") token inside.
    assert model.config.model.quick_gelu == (name == "vit")
    assert (fixture["tokens"][1, 1:-1] == 0).any() or name == "resnet"


@pytest.mark.parametrize("name", MODELS)
def test_exported_names_and_shapes_equal_open_clip_state_dict(name):
    _, config = _module(name)
    reference = load_file(os.path.join(FIXTURES, name, "open_clip_model.safetensors"))
    assert _shapes(config.model) == {k: v.shape for k, v in reference.items()}


def test_model_cfg_round_trips_through_clipjax_config():
    for name in MODELS:
        module, config = _module(name)
        config.data.tokenizer.vocab_size = 100
        written = weights.open_clip_config(config, eos_id=3, pad_id=0)["model_cfg"]
        again = weights.model_config_from_open_clip(written, "x")["model"]
        original = weights.model_config_from_open_clip(_model_cfg(name), "x")["model"]
        assert again == original


def _embedder(module, config):
    """(variables -> (image, text) embeddings of fixed inputs), compiled once."""
    rng = np.random.default_rng(0)
    size, length = config.model.image.size, config.model.text.context_length
    images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    tokens = np.zeros((3, length), np.int32)
    tokens[:, :5] = [2, 9, 17, 0, 3]

    @jax.jit
    def embed(variables):
        image = module.apply(variables, images, method=TwoTower.encode_image)["embed"]
        return image, module.apply(variables, tokens, method=TwoTower.encode_text)["embed"]

    return embed


@pytest.mark.parametrize("kind", ["vit", "resnet", "siglip"])
def test_state_dict_round_trip(kind):
    """ViT and SigLIP leaves come back exactly; the ResNet's image_projection is folded into
    the attention pool's c_proj and comes back as the identity, with the same embeddings."""
    name = "resnet" if kind == "resnet" else "vit"
    module, config = _module(name, quick_gelu=False)
    config.model.image.size = 32  # smaller than the fixture's: a faster compile
    if kind == "siglip":
        module = module.clone(bias_init=-10.0)
    variables = _init(module, config, seed=1)
    like = weights.flatten(variables)
    state_dict = weights.to_state_dict(variables, module)
    for key, value in state_dict.items():
        want = np.int64 if key.endswith("num_batches_tracked") else np.float32
        assert value.dtype == want, key
    if kind == "siglip":
        assert state_dict["logit_bias"].shape == ()
        assert state_dict["logit_bias"] == variables["params"]["bias"]
    leaves = weights.from_state_dict(state_dict, module, like, "sd")
    assert set(leaves) == set(like)
    restored = flax.traverse_util.unflatten_dict(leaves, sep="/")
    if kind != "resnet":
        for path, value in like.items():
            np.testing.assert_array_equal(leaves[path], value, err_msg=path)
    else:
        np.testing.assert_array_equal(leaves["params/image_projection/kernel"], np.eye(16))
    embed = _embedder(module, config)
    got, want = embed(restored), embed(variables)
    for got_embeds, want_embeds in zip(got, want, strict=True):
        np.testing.assert_allclose(got_embeds, want_embeds, atol=1e-6)


def test_scanned_towers_export_and_import_like_unrolled_ones():
    """model.scan_layers stacks the blocks' leaves: the state_dict is the same, and an import
    into a scanned model stacks it back."""
    module, config = _module("vit", quick_gelu=False)
    config.model.image.size = 32
    variables = _init(module, config, seed=2)
    scanned = module.clone(scan_layers=True)
    scanned_like = weights.abstract_leaves(scanned, config.model)
    stacked = {}
    for path in scanned_like:
        if "/transformer/blocks/" in path:
            head, tail = path.split("/transformer/blocks/")
            depth = scanned_like[path].shape[0]
            blocks = [f"{head}/transformer/block_{i:02d}/{tail}" for i in range(depth)]
            stacked[path] = np.stack([weights.flatten(variables)[b] for b in blocks])
        else:
            stacked[path] = weights.flatten(variables)[path]
    state_dict = weights.to_state_dict(variables, module)
    scanned_state_dict = weights.to_state_dict(
        flax.traverse_util.unflatten_dict(stacked, sep="/"), scanned
    )
    assert scanned_state_dict.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        np.testing.assert_array_equal(scanned_state_dict[name], tensor, err_msg=name)
    leaves = weights.from_state_dict(state_dict, scanned, scanned_like, "sd")
    assert leaves.keys() == stacked.keys()
    for path, leaf in stacked.items():
        np.testing.assert_array_equal(leaves[path], leaf, err_msg=path)


def test_state_dict_errors_name_the_tensor(tmp_path):
    module, config = _module("vit")
    variables = _init(module, config)
    like = weights.flatten(variables)
    good = weights.to_state_dict(variables, module)

    def error(state_dict):
        with pytest.raises(weights.WeightsError) as e:
            weights.from_state_dict(state_dict, module, like, "w.safetensors")
        return str(e.value)

    missing = {k: v for k, v in good.items() if k != "visual.ln_post.weight"}
    assert error(missing) == "w.safetensors: tensor 'visual.ln_post.weight' is missing."
    extra = {**good, "visual.extra": np.zeros(3), "visual.more": np.zeros(1)}
    assert error(extra) == (
        "w.safetensors: tensor 'visual.extra' has no place in the model its config describes "
        "(and 1 more)."
    )
    transposed = {**good, "visual.proj": good["visual.proj"].T}
    assert error(transposed) == (
        "w.safetensors: tensor 'visual.proj' has shape (16, 192); the model described by its "
        "config needs (192, 16)."
    )
    qkv = {**good, "transformer.resblocks.0.attn.in_proj_weight": np.zeros((90, 32))}
    assert "needs (96, 32)." in error(qkv)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["vision_cfg"].update(timm_model_name="vit_base"),
            "model_cfg.vision_cfg.timm_model_name='vit_base' is a tower clipjax does not have",
        ),
        (
            lambda c: c["vision_cfg"].update(width=200),
            "a ViT of width 200, 3 heads and MLP 800 is no clipjax ViT size",
        ),
        (
            lambda c: c["text_cfg"].update(pool_type="last"),
            "text_cfg.pool_type='last'; clipjax pools at the end-of-text token",
        ),
        (lambda c: c["vision_cfg"].update(layers=[1, 1, 1, 1]), "[1, 1, 1, 1] is no clipjax"),
        (lambda c: c.pop("text_cfg"), "model_cfg has no 'text_cfg'."),
    ],
)
def test_model_cfg_errors(change, message):
    model_cfg = _model_cfg("vit")
    change(model_cfg)
    with pytest.raises(weights.WeightsError) as e:
        weights.model_config_from_open_clip(model_cfg, "cfg.json")
    assert str(e.value).startswith("cfg.json: ") and message in str(e.value)


def test_mi_block_models_are_not_exported():
    module, _ = _module("vit", projection="mi_block")
    with pytest.raises(weights.WeightsError, match="has no open_clip form"):
        weights.rules(module)


def test_load_errors_are_one_line(tmp_path, small_tokenizer):
    with pytest.raises(config_lib.ConfigError) as e:
        inference.load(str(tmp_path))
    assert str(e.value) == (
        f"{tmp_path} is neither a clipjax workdir (config.json and checkpoints/) nor an "
        "open_clip folder (open_clip_config.json and open_clip_model.safetensors)."
    )
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(os.path.join(FIXTURES, "vit", "open_clip_config.json"), folder)
    with pytest.raises(config_lib.ConfigError, match="open_clip_model.safetensors does not load"):
        inference.load(str(folder), tokenizer=small_tokenizer)
    reference = load_file(os.path.join(FIXTURES, "vit", "open_clip_model.safetensors"))
    save_file(
        {k: v for k, v in reference.items() if k != "logit_scale"},
        str(folder / "open_clip_model.safetensors"),
    )
    with pytest.raises(weights.WeightsError, match="tensor 'logit_scale' is missing"):
        inference.load(str(folder), tokenizer=small_tokenizer)
    with pytest.raises(config_lib.ConfigError, match="the tokenizer has 49408 ids but the model"):
        inference.load(
            os.path.join(FIXTURES, "vit"),
            tokenizer="openai",
        )
    with pytest.raises(config_lib.ConfigError, match="one set of weights; drop step"):
        inference.load(os.path.join(FIXTURES, "vit"), step=3)


def test_an_open_clip_folder_without_a_tokenizer_reads_the_shipped_bpe_vocabulary(tmp_path):
    """open_clip's default tokenizer is OpenAI's BPE: clipjax ships the vocabulary, so a saved
    folder loads without open_clip installed, with open_clip's ids; a model that names a
    Hugging Face tokenizer is refused in one line instead."""
    folder = tmp_path / "bpe"
    folder.mkdir()
    with open(os.path.join(FIXTURES, "vit", "open_clip_config.json")) as f:
        config = json.load(f)
    config["model_cfg"]["text_cfg"]["vocab_size"] = 49408
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state_dict = load_file(os.path.join(FIXTURES, "vit", "open_clip_model.safetensors"))
    embedding = state_dict["token_embedding.weight"]
    state_dict["token_embedding.weight"] = np.pad(embedding, ((0, 49408 - len(embedding)), (0, 0)))
    save_file(state_dict, str(folder / "open_clip_model.safetensors"))

    model = inference.load(str(folder))
    with open(os.path.join(FIXTURES, "bpe.json")) as f:
        fixture = json.load(f)
    np.testing.assert_array_equal(
        model.tokenizer.encode(fixture["captions"], 77), fixture["ids"]["77"]
    )
    tokens = model.tokenize(fixture["captions"])  # at the model's context length, 16
    assert model.encode_text(tokens).shape == (len(fixture["captions"]), 16)

    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(config_lib.ConfigError) as e:
        inference.load(str(folder))
    assert str(e.value) == (
        f"{folder}: its model uses the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP', which "
        "clipjax does not read; pass tokenizer= a sentencepiece model of the same vocabulary."
    )


def _shapes(model_config):
    module = TwoTower.from_config(model_config)
    return weights.state_dict_shapes(module, weights.abstract_leaves(module, model_config))


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "RN101"])
def test_official_open_clip_shapes_import(name):
    """The OpenAI and LAION checkpoints' shapes (open_clip's model configs, built on torch's
    meta device in the fixture script): every tensor has its place, with its shape."""
    with open(os.path.join(FIXTURES, "shapes.json")) as f:
        official = json.load(f)[name]
    config = config_lib.base_config()
    config.model.update(weights.model_config_from_open_clip(official["model_cfg"], name)["model"])
    want = {k: tuple(v) for k, v in official["shapes"].items()}
    assert _shapes(config.model) == want


@pytest.mark.parametrize("config_name, name", [("clip_vitb32", "ViT-B-32"), ("declip_r50", "RN50")])
def test_full_size_configs_export_open_clip_shapes(config_name, name):
    """clipjax's own ViT-B/32 and RN50 (whose extra projection is folded) export as open_clip's
    ViT-B-32 and RN50."""
    with open(os.path.join(FIXTURES, "shapes.json")) as f:
        want = {k: tuple(v) for k, v in json.load(f)[name]["shapes"].items()}
    config = importlib.import_module(f"configs.{config_name}").get_config()
    assert _shapes(config.model) == want
