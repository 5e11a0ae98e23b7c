r"""Export a training run as a folder that open_clip loads as it is.

  python -m clipjax.export --workdir=/tmp/clip_local --output=/tmp/clip_local_export
  python -m clipjax.export --workdir=/tmp/clip_local --step=400 --output=/tmp/export_400

In Python: `open_clip.create_model_and_transforms("local-dir:/tmp/clip_local_export")`.
The folder holds:
  open_clip_config.json        model_cfg (the run's shapes; text pooled at the end token,
                               `pool_type="eos"`) and preprocess_cfg (size, mean, std)
  open_clip_model.safetensors  the towers, projections and logit_scale (and SigLIP's
                               logit_bias) in open_clip's state_dict names, float32
  tokenizer.model              the run's sentencepiece model (or OpenAI's BPE vocabulary
                               bpe_simple_vocab_16e6.txt.gz if the run used it)
  config.json                  the run's clipjax config
  README.md                    a model card: method, data, steps, final metrics

Objective heads (DeCLIP's SimSiam and masked-LM heads, CLIP-Lite's prior discriminators) are
not exported. CLIP-Lite's MI-block projections have no open_clip form, so a CLIP-Lite run is
refused; `clipjax.load(WORKDIR)` uses it in clipjax. FILIP's token-wise head has no open_clip
form either: its export carries the global towers and projections, and says so in one line (in
the log and the model card). The folder is written whole or not at all.
"""

import json
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging

from clipjax import inference, metrics, weights
from clipjax.data import bpe
from clipjax.errors import ConfigError

# One line for exports whose method scores with a head open_clip has no form for.
NOT_EXPORTED = {
    "filip": "FILIP's token-wise head (token mappings and scale) has no open_clip form: this "
    "export carries the global towers and projections, which FILIP's loss does not train "
    "unless config.filip.clip_weight > 0; `clipjax.load(WORKDIR)` keeps the token-wise "
    "scores.",
}


def model_card(model, workdir: str) -> str:
    """README.md of an export: what was trained, on what, for how long, and how it scored."""
    config = model.config
    lines = [
        f"# clipjax {config.objective} model",
        "",
        f"- Method: `{config.objective}`; image tower `{config.model.image.variant}` at "
        f"{config.model.image.size} px, text tower {config.model.text.depth}×"
        f"{config.model.text.width}, joint space {config.model.embed_dim}.",
        f"- Data: `{config.data.train}`, batch {config.batch_size}.",
        f"- Steps: {model.step} of {config.total_steps}.",
        f"- Exported from `{workdir}`.",
        "",
        "Load it with open_clip: `open_clip.create_model_and_transforms('local-dir:THIS_DIR')`,"
        " tokenising with this folder's tokenizer; or with clipjax: `clipjax.load('THIS_DIR')`.",
    ]
    if config.objective in NOT_EXPORTED:
        lines += ["", NOT_EXPORTED[config.objective]]
    try:
        rows, _ = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    except metrics.MetricsFileError:
        rows = []
    evals = {}
    for row in rows:
        if row.get("step", -1) <= model.step:
            evals.update({k: (row["step"], v) for k, v in row.items() if k.startswith("eval/")})
    if evals:
        lines += ["", "| metric | step | value |", "| --- | ---: | ---: |"]
        lines += [f"| `{k}` | {step} | {value:.4f} |" for k, (step, value) in sorted(evals.items())]
    return "\n".join(lines) + "\n"


def export(workdir: str, output: str, step: int | None = None) -> str:
    """Write the export folder of checkpoint `step` (default: the latest) of `workdir` to
    `output`, which must not exist or be empty. Returns `output`."""
    output = os.path.abspath(output)
    if os.path.isfile(os.path.join(workdir, inference.OPEN_CLIP_CONFIG)):
        raise ConfigError(f"--workdir={workdir} is already an open_clip folder.")
    if os.path.isdir(output) and os.listdir(output):
        raise ConfigError(f"--output={output} is not empty; name a new folder.")
    model = inference.load(workdir, step=step)
    if model.config.objective in NOT_EXPORTED:
        logging.warning("%s", NOT_EXPORTED[model.config.objective])
    state_dict = weights.to_state_dict(model.variables, model.module)
    tokenizer = model.tokenizer
    content = weights.open_clip_config(model.config, tokenizer.eos_id, tokenizer.pad_id)
    content["preprocess_cfg"]["interpolation"] = model.interpolation
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        from safetensors.numpy import save_file

        save_file(state_dict, os.path.join(staging, inference.OPEN_CLIP_WEIGHTS))
        with open(os.path.join(staging, inference.OPEN_CLIP_CONFIG), "w") as f:
            json.dump(content, f, indent=2)
        if isinstance(tokenizer, bpe.BpeTokenizer):
            name, data = inference.BPE_VOCAB, tokenizer.vocab_gz
        else:
            name, data = inference.SENTENCEPIECE, tokenizer.model_proto
        with open(os.path.join(staging, name), "wb") as f:
            f.write(data)
        with open(os.path.join(staging, "config.json"), "w") as f:
            f.write(model.config.to_json_best_effort(indent=2))
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(model, workdir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logging.info("Exported %s step %d to %s", workdir, model.step, output)
    return output


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when the command runs: tests import this module next to clipjax.main,
    which has a --workdir too."""
    flags.DEFINE_string("workdir", None, "A directory clipjax.main trained in.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the latest.")
    flags.DEFINE_string("output", None, "The folder to write; must not exist or be empty.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.output:
        print("clipjax.export: --workdir and --output must be given.", file=sys.stderr)
        sys.exit(2)
    metrics.quiet_library_logs()
    try:
        output = export(FLAGS.workdir, FLAGS.output, FLAGS.step)
    except ConfigError as e:
        print(f"clipjax.export: {e}", file=sys.stderr)
        sys.exit(2)
    print(output)


if __name__ == "__main__":
    define_flags()
    app.run(main)
