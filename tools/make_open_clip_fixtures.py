"""Makes tests/fixtures/open_clip/ with open_clip itself, so that CI can check clipjax's weight
import and BPE tokenizer against open_clip without torch.

Run it where torch and open_clip are installed, which CI never does (torch is ~6 GB):

  python -m venv /tmp/torchvenv && . /tmp/torchvenv/bin/activate
  pip install torch open_clip_torch safetensors ftfy
  python tools/make_open_clip_fixtures.py --output=tests/fixtures/open_clip

It writes:
- `vit/` and `resnet/`: tiny random open_clip `CLIP` models as open_clip `local-dir` folders
  (open_clip_config.json + open_clip_model.safetensors, as open_clip's save_for_hf writes
  them), and `embeddings.npz`: uint8 images, int32 tokens, and open_clip's unit image and text
  embeddings of them in float32. Weights are rounded to float16 and stored so, to keep the
  files small; the embeddings are computed from those rounded weights in float32. The ViT is
  OpenAI-styled (QuickGELU, argmax pooling, a 0 token inside a caption); the ResNet pools at
  an explicit eos id. BatchNorm and LayerNorm parameters and statistics are randomised, so
  that none is the identity.
- `shapes.json`: the model_cfg and state_dict shapes of open_clip's ViT-B-32, ViT-B-16,
  ViT-L-14, RN50 and RN101 (the OpenAI and LAION checkpoints' shapes), built without weights.
- `bpe.json`: open_clip's tokenizer ids of tricky captions at context lengths 77 and 12.

OpenAI's BPE vocabulary itself ships in the package (`clipjax/data/bpe_simple_vocab_16e6.txt.gz`,
with its MIT licence); this script checks that it is the file open_clip ships.
"""

import argparse
import gzip
import json
import os

import numpy as np
import open_clip
import safetensors.torch
import torch

from clipjax.data import bpe

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

MODELS = {
    "vit": {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 192,
            "patch_size": 16,
            "head_width": 64,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 2},
    },
    "resnet": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": [3, 4, 6, 3], "width": 8},
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 512,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "pool_type": "eos",
            "eos_id": 3,
        },
    },
}

CAPTIONS = [
    "a photo of a cat.",
    "A Photo Of A CAT!!!   with   spaces\tand\nnewlines",
    "don't stop: it's 12,345.67 km/h — isn't it?",
    "café naïve façade Ærøskøbing",
    "東京タワーの写真 and 😀 emoji 👍🏽",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "<|startoftext|> OpenAI's special tokens <|endoftext|>, as text",
    "<start_of_text> open_clip's <END_OF_TEXT> are ids",
    "hello! world!",
    "wow!~ id 0 is a piece",
    "",
    " ".join(["an over-long caption that keeps going"] * 12),
]


def randomise_norms(model, rng):
    """BatchNorm/LayerNorm weights, biases and running statistics away from the identity."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = None
            if name.endswith("running_var"):
                values = rng.uniform(0.5, 1.5, tensor.shape)
            elif name.endswith("running_mean"):
                values = rng.normal(0.0, 0.2, tensor.shape)
            elif (".bn" in name or ".ln" in name or name.startswith("ln_")) and tensor.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                values = base + rng.normal(0.0, 0.2, tensor.shape)
            if values is not None:
                tensor.copy_(torch.from_numpy(values.astype(np.float32)))
        for tensor in model.state_dict().values():  # the stored float16 values, exactly
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def tokens_for(model_cfg, rng, n=4):
    text = model_cfg["text_cfg"]
    length, vocab = text["context_length"], text["vocab_size"]
    eos = text.get("eos_id", vocab - 1)  # argmax pooling: the end token has the largest id
    tokens = np.zeros((n, length), np.int32)
    for row in range(n):
        used = [length, 7, 3, 10][row]
        body = rng.integers(4, vocab - 1, used - 2)
        if row == 1:
            body[1] = 0  # OpenAI's "!" is id 0, the pad id
        tokens[row, :used] = [1, *body, eos]
    return tokens


def write_model(name, model_cfg, output, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    randomise_norms(model, rng)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(1 / 0.07)))
    folder = os.path.join(output, name)
    os.makedirs(folder, exist_ok=True)
    state_dict = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    safetensors.torch.save_file(state_dict, os.path.join(folder, "open_clip_model.safetensors"))
    preprocess_cfg = {"mean": MEAN.tolist(), "std": STD.tolist(), "interpolation": "bicubic"}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)

    size = model_cfg["vision_cfg"]["image_size"]
    images = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    tokens = tokens_for(model_cfg, rng)
    pixels = (images.astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        image_embeds = model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2), True)
        text_embeds = model.encode_text(torch.from_numpy(tokens).long(), True)
    np.savez(
        os.path.join(folder, "embeddings.npz"),
        images=images,
        tokens=tokens,
        image_embeds=image_embeds.numpy(),
        text_embeds=text_embeds.numpy(),
    )
    print(f"{folder}: {len(state_dict)} tensors, open_clip {open_clip.__version__}")


OFFICIAL = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "RN101")


def write_official_shapes(output):
    models = {}
    for name in OFFICIAL:
        model_cfg = open_clip.get_model_config(name)
        with torch.device("meta"):  # shapes only
            model = open_clip.CLIP(**model_cfg)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        models[name] = {"model_cfg": model_cfg, "shapes": shapes}
    with open(os.path.join(output, "shapes.json"), "w") as f:
        json.dump(models, f)


def write_bpe(output):
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    ids = {str(n): tokenizer(CAPTIONS, context_length=n).tolist() for n in (77, 12)}
    with open(os.path.join(output, "bpe.json"), "w") as f:
        json.dump({"captions": CAPTIONS, "ids": ids}, f, ensure_ascii=False, indent=1)
    vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with open(vocab, "rb") as theirs, open(bpe.OPENAI_VOCAB, "rb") as ours:
        if gzip.decompress(theirs.read()) != gzip.decompress(ours.read()):
            raise SystemExit(f"{vocab} differs from {bpe.OPENAI_VOCAB}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="tests/fixtures/open_clip")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    for seed, (name, model_cfg) in enumerate(MODELS.items()):
        write_model(name, model_cfg, args.output, seed)
    write_official_shapes(args.output)
    write_bpe(args.output)


if __name__ == "__main__":
    main()
