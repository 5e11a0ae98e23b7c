"""Trained models outside the trainer: export, clipjax.load, predict, evaluate --model and
init_from, on tiny ViT and ResNet runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipjax import export, inference, predict, train, weights
from clipjax.config import ConfigError
from clipjax.data import shapes
from clipjax.evaluate import checkpoint_eval
from clipjax.metrics import read_metrics
from tests import tiny


def _config():
    """Two steps and one evaluation (zero-shot). The ResNet's export, with its projection
    folded, is checked in test_weights."""
    c = tiny.tiny_config()
    c.total_steps = 2
    c.log_every = 1
    c.eval_every = 2
    c.ckpt_every = 2
    c.evals = {"shapes": c.evals.shapes}
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step CLIP run and its export."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config()
    train.run(config, workdir)
    output = export.export(workdir, os.path.join(str(tmp_path_factory.mktemp("x")), "export"))
    return config, workdir, output


def _inputs(model):
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    pixels = np.stack([model.preprocess(image) for image in images])
    tokens = model.tokenize(["a red circle", "two blue squares!", ""])
    return pixels, tokens


def test_export_folder(run):
    config, workdir, output = run
    assert sorted(os.listdir(output)) == [
        "README.md",
        "config.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.model",
    ]
    trained = inference.load(workdir)
    with open(os.path.join(output, "open_clip_config.json")) as f:
        written = json.load(f)
    assert written["model_cfg"] == weights.open_clip_config(trained.config, 3, 0)["model_cfg"]
    assert written["model_cfg"]["text_cfg"]["pool_type"] == "eos"
    assert written["preprocess_cfg"]["size"] == config.model.image.size
    with open(os.path.join(output, "README.md")) as f:
        card = f.read()
    zeroshot = read_metrics(os.path.join(workdir, "metrics.jsonl"))[0][-1]
    assert "- Steps: 2 of 2." in card
    assert (
        f"| `eval/shapes/zeroshot_top1` | 2 | {zeroshot['eval/shapes/zeroshot_top1']:.4f} |" in card
    )
    with open(os.path.join(workdir, "tokenizer.model"), "rb") as f:
        assert f.read() == trained.tokenizer.model_proto


def test_export_then_load_gives_the_run_embeddings(run):
    _, workdir, output = run
    trained, exported = inference.load(workdir), inference.load(output)
    assert trained.step == 2 and exported.step is None
    pixels, tokens = _inputs(trained)
    np.testing.assert_array_equal(
        tokens, exported.tokenize(["a red circle", "two blue squares!", ""])
    )
    np.testing.assert_allclose(
        exported.encode_image(pixels), trained.encode_image(pixels), atol=1e-6
    )
    np.testing.assert_allclose(exported.encode_text(tokens), trained.encode_text(tokens), atol=1e-6)
    assert exported.logit_scale == pytest.approx(trained.logit_scale, rel=1e-6)
    # The images are cut to the largest centred square, then resized.
    assert pixels.shape == (5, trained.image_size, trained.image_size, 3)
    trained.batch_size = 2  # batched with padding: the same vectors
    np.testing.assert_allclose(
        trained.encode_image(pixels), exported.encode_image(pixels), atol=1e-6
    )


def test_export_refuses_a_folder_in_use(run, tmp_path):
    _, workdir, output = run
    with pytest.raises(ConfigError, match="is not empty; name a new folder"):
        export.export(workdir, output)
    with pytest.raises(ConfigError, match="is already an open_clip folder"):
        export.export(output, str(tmp_path / "again"))
    assert not os.listdir(tmp_path)


def test_evaluate_model_equals_the_checkpoint_evaluation(run):
    config, workdir, output = run
    _, from_checkpoint, _ = checkpoint_eval.evaluate(config, workdir)
    from_export, _ = checkpoint_eval.evaluate_model(config.copy_and_resolve_references(), output)
    assert from_export.keys() == from_checkpoint.keys()
    for key, value in from_checkpoint.items():
        assert from_export[key] == pytest.approx(value, abs=1 / 32 + 1e-9), key  # 32 examples


def test_predict_prints_probabilities_and_skips_unreadable_files(run, tmp_path):
    _, _, output = run
    source = shapes.ShapesSource("eval", size=2, render_size=48)
    for i in range(2):
        Image.fromarray(source[i]["image"]).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"not a png")
    labels = ["red circle", "blue square", "green triangle"]
    report = predict.predict(output, str(tmp_path / "*.png"), labels, "a {}.", top=3)
    lines = report.splitlines()
    assert lines[0].startswith(f"{tmp_path}/2.png: skipped, not a readable image")
    model = inference.load(output)
    images = np.stack([model.preprocess(Image.open(tmp_path / f"{i}.png")) for i in range(2)])
    logits = (
        model.logit_scale
        * model.encode_image(images)
        @ model.encode_text(model.tokenize([f"a {label}." for label in labels])).T
    )
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for line, row in zip(lines[1:], probs, strict=True):
        printed = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
        assert list(printed) == [labels[i] for i in np.argsort(-row)]
        for label, value in printed.items():
            assert float(value) == pytest.approx(row[labels.index(label)], abs=5e-4)
    for bad, message in [
        ({"labels": ["one"]}, "--labels must name at least two"),
        ({"pattern": str(tmp_path / "*.jpg")}, "matches no file"),
        ({"template": "a photo"}, "has no {} for the label"),
    ]:
        args = {"pattern": str(tmp_path / "*.png"), "labels": labels, "template": "{}"} | bad
        with pytest.raises(ConfigError, match=message):
            predict.predict(output, args["pattern"], args["labels"], args["template"], 3)


def test_init_from_starts_at_the_loaded_weights(run, tmp_path):
    config, _, output = run
    config = config.copy_and_resolve_references()
    config.init_from, config.total_steps = output, 1
    workdir = str(tmp_path / "finetune")
    train.run(config, workdir)
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]
    step0 = {k: v for k, v in rows[0].items() if k != "step"}
    assert rows[0]["step"] == 0 and step0
    expected, _ = checkpoint_eval.evaluate_model(config.copy_and_resolve_references(), output)
    for key, value in expected.items():
        assert step0[key] == pytest.approx(value, abs=1 / 32 + 1e-9), key
    exported, kept = (os.path.join(d, "tokenizer.model") for d in (output, workdir))
    with open(exported, "rb") as a, open(kept, "rb") as b:
        assert a.read() == b.read()  # the loaded model's tokenizer, kept for resumes
    config.model.text.width = 64
    with pytest.raises(ConfigError) as e:
        train.run(config, str(tmp_path / "mismatch"))
    assert str(e.value) == (
        "config.init_from: the model has model.text.width=32, this config 64; set "
        "--config.model.text.width=32."
    )


def test_export_command_line(run, tmp_path):
    _, workdir, _ = run
    target = str(tmp_path / "cli")
    done = subprocess.run(
        [sys.executable, "-m", "clipjax.export", f"--workdir={workdir}", f"--output={target}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == target and os.path.isfile(f"{target}/open_clip_model.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "clipjax.export", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "clipjax.export: --workdir and --output must be given."


def test_a_filip_run_scores_tokens_and_its_export_says_what_it_carries(tmp_path, caplog):
    """`clipjax.load` of a FILIP workdir embeds tokens as the run's objective does, and predicts
    with the token-wise zero-shot scores (σ_dense times, for each image, the mean over its patches
    of the max over the prompt's tokens, the prompt's tokens divided by their joint norm);
    `evaluate --model` of the workdir equals the checkpoint's evaluation. The export carries
    the global towers and says so in one line."""
    config = tiny.tiny_config("filip_vitb32")
    config.total_steps, config.ckpt_every, config.eval_every = 2, 2, 100
    config.evals = {k: config.evals[k] for k in ("shapes", "shapes_retrieval")}
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    model = inference.load(workdir)
    assert model.scores_tokens
    source = shapes.ShapesSource("eval", size=3, render_size=48)
    for i in range(3):
        Image.fromarray(source[i]["image"]).save(tmp_path / f"{i}.png")
    images = np.stack([model.preprocess(Image.open(tmp_path / f"{i}.png")) for i in range(3)])
    labels = ["red circle", "blue square", "green triangle"]
    prompts = model.tokenize([f"a {label}." for label in labels])

    with tiny.built(config) as (objective, _, _, _):  # 8 devices: 8 rows
        params = model.variables["params"]
        want_image = objective.embed_image_tokens(
            params, {}, np.resize(images, (8, *images.shape[1:]))
        )[:3]
        want_text = objective.embed_text_tokens(
            params, {}, np.resize(prompts, (8, prompts.shape[1]))
        )[:3]
    image_tokens, text_tokens = model.encode_image_tokens(images), model.encode_text_tokens(prompts)
    np.testing.assert_allclose(image_tokens, want_image, atol=1e-6)
    np.testing.assert_allclose(text_tokens, want_text, atol=1e-6)

    sigma = np.exp(np.float64(model.variables["params"]["token_heads"]["log_scale"]))
    logits = np.zeros((3, 3))
    for c, prompt in enumerate(text_tokens.astype(np.float64)):
        kept = prompt[np.abs(prompt).sum(axis=-1) > 0]
        kept /= np.sqrt((kept**2).sum())
        for i, patches in enumerate(image_tokens.astype(np.float64)):
            logits[i, c] = sigma * np.mean([max(p @ t for t in kept) for p in patches])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    report = predict.predict(workdir, str(tmp_path / "*.png"), labels, "a {}.", top=3)
    for line, row in zip(report.splitlines(), probs, strict=True):
        printed = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
        for label, value in printed.items():
            assert float(value) == pytest.approx(row[labels.index(label)], abs=5e-4)

    _, from_checkpoint, _ = checkpoint_eval.evaluate(config, workdir)
    from_model, _ = checkpoint_eval.evaluate_model(config.copy_and_resolve_references(), workdir)
    assert from_model == pytest.approx(from_checkpoint, abs=1e-9)

    with caplog.at_level("WARNING"):
        output = export.export(workdir, str(tmp_path / "export"))
    assert export.NOT_EXPORTED["filip"] in caplog.text
    with open(f"{output}/README.md") as f:
        assert export.NOT_EXPORTED["filip"] in f.read()
    exported = inference.load(output)
    assert not exported.scores_tokens
    np.testing.assert_allclose(exported.encode_image(images), model.encode_image(images), atol=1e-6)
    with pytest.raises(ConfigError, match="has no token-wise scores"):
        exported.encode_image_tokens(images)
