"""The evaluations of `config.evals`: each loads its data once and scores embeddings per call.

Kinds (`clipjax.evaluate.KINDS`, each kind's fields in its module):
- `zeroshot`: classify the source's images by their nearest class prompt-ensemble embedding.
  Metrics `zeroshot_top1`, `zeroshot_top5`.
- `retrieval`: images ↔ all their captions. Metrics `i2t_r{1,5,10}`, `t2i_r{1,5,10}`.
- `linear_probe`: logistic regression on frozen image features of `train_source` (the tower's
  output before the projection, or with `features="embed"` the unit embedding), L2 chosen
  on a held-out part of it, scored on `source`. Metrics `probe_top1`, `probe_top5`, `probe_l2`.
"""

import functools
import time

import jax
import numpy as np
from absl import logging

from clipjax import config as config_lib
from clipjax import evaluate, sharding
from clipjax.data import eval_input


class _NonFinite(Exception):
    """An embedding was NaN or infinite (a diverged model): no score means anything."""


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed_chunk(embed_fn, mesh, params, model_state, inputs):
    """One chunk through `embed_fn`, split over the batch axes; the result on every device."""
    inputs = jax.lax.with_sharding_constraint(inputs, sharding.batch_sharding(mesh))
    out = embed_fn(params, model_state, inputs)
    return jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


class Evaluator:
    """One `config.evals` entry. Loads its data at construction and has its kind prepare it
    (ValueError for data that does not fit the evaluation; what the kind keeps is `prepared`);
    `evaluator(params, model_state)` returns `eval/<name>/<metric>`. The kind's `prepare` and
    `score` read `name`, `settings`, `objective`, `tokenizer`, `context_length`, the held-out
    `images` with `valid` (which of this process's slots hold one), and use `load` and
    `labels`."""

    def __init__(
        self,
        name: str,
        settings,
        *,
        objective,
        tokenizer,
        mesh,
        image_size: int,
        context_length: int,
        max_skipped_fraction: float,
        loaded: dict | None = None,
    ):
        if settings.kind not in evaluate.KINDS:
            raise ValueError(
                f"config.evals.{name}.kind={settings.kind!r} is not one of "
                f"{', '.join(evaluate.KINDS)}."
            )
        self.name, self.kind, self.settings = name, settings.kind, settings
        self._kind_module = evaluate.KINDS[settings.kind]
        self.objective, self.mesh = objective, mesh
        self.tokenizer, self.context_length = tokenizer, context_length
        # A multiple of the data-parallel size, so every chunk splits over the batch axes.
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = -(-settings.batch_size // dp) * dp
        # This process's rows of each chunk: it reads and embeds only those (see `_embed`).
        self._rows = sharding.process_rows(mesh, self.batch_size)
        self._load_args = {
            "tokenizer": tokenizer,
            "image_size": image_size,
            "context_length": context_length,
            "max_skipped_fraction": max_skipped_fraction,
        }
        # Shared by the evaluators of one config: a source they share is read once.
        self._loaded = {} if loaded is None else loaded
        start = time.perf_counter()
        data = self.load(settings.source, num_examples=settings.num_examples)
        self.images, self.valid = data["image"], data["valid"]
        self.prepared = self._kind_module.prepare(self, data)
        logging.info(
            "eval %s (%s): loaded %d images in %.1f s",
            name,
            self.kind,
            self.valid.sum(),
            time.perf_counter() - start,
        )

    def load(self, spec: str, num_examples: int) -> dict:
        """`eval_input.eval_arrays` of `spec`: this process's rows of each chunk of images, and
        what every process read; read once per (spec, num_examples, chunk)."""
        key = (spec, num_examples, self.batch_size)
        if key not in self._loaded:
            self._loaded[key] = eval_input.eval_arrays(
                spec,
                num_examples=num_examples,
                share=(*self._rows, self.batch_size),
                **self._load_args,
            )
        return self._loaded[key]

    def labels(self, data: dict, spec: str) -> np.ndarray:
        """The labels of `data` (read from `spec`); ValueError unless every example has one."""
        labels = data["label"]
        if (labels < 0).all():
            raise ValueError(
                f"config.evals.{self.name}: source {spec!r} has no class labels, which a "
                f"{self.kind} evaluation needs; use a labelled source (e.g. 'folder:' or a "
                "'csv:' with label=COLUMN)."
            )
        if (labels < 0).any():
            raise ValueError(
                f"config.evals.{self.name}: {(labels < 0).sum()} of {len(labels)} examples of "
                f"source {spec!r} have no label; a {self.kind} evaluation needs all labelled."
            )
        return labels

    def _embed(self, embed_fn, params, model_state, rows: np.ndarray, keep) -> np.ndarray:
        """This process's `rows` of each chunk of `batch_size` inputs → the embeddings of every
        chunk, float64, in order, `[keep]` (the slots that hold an input)."""
        sharded = sharding.batch_sharding(self.mesh)
        per_chunk = self._rows[1] - self._rows[0]
        out = []
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start : start + per_chunk]
            chunk = jax.make_array_from_process_local_data(
                sharded, chunk, (self.batch_size, *chunk.shape[1:])
            )
            embeds = _embed_chunk(embed_fn, self.mesh, params, model_state, chunk)
            out.append(np.asarray(embeds))
        return np.concatenate(out).astype(np.float64)[keep]

    def _embed_all(self, embed_fn, params, model_state, inputs: np.ndarray) -> np.ndarray:
        """(N, ...) inputs that every process holds → (N, d) float64 embeddings; each process
        embeds its rows of each chunk (the last chunk padded with copies of the last input)."""
        chunks = -(-len(inputs) // self.batch_size)
        padded = np.concatenate(
            [inputs, np.repeat(inputs[-1:], chunks * self.batch_size - len(inputs), axis=0)]
        )
        lo, hi = self._rows
        rows = padded.reshape(chunks, self.batch_size, *inputs.shape[1:])[:, lo:hi]
        rows = rows.reshape(-1, *inputs.shape[1:])
        return self._embed(embed_fn, params, model_state, rows, slice(len(inputs)))

    def chance(self) -> dict[str, float]:
        """`eval/<name>/<metric>` of a model that guesses, for the metrics where it is known."""
        levels = self._kind_module.chance_levels(self, self.prepared)
        return {f"eval/{self.name}/{k}": float(v) for k, v in levels.items()}

    def __call__(self, params, model_state) -> dict[str, float]:
        start = time.perf_counter()

        def embed(embed_fn, inputs, valid=None):
            """`inputs`: this process's slots of the images (`valid`: which hold one), or
            inputs every process holds whole (prompts, captions)."""
            if valid is None:
                embeds = self._embed_all(embed_fn, params, model_state, inputs)
            else:
                embeds = self._embed(embed_fn, params, model_state, inputs, valid)
            if not np.isfinite(embeds).all():
                raise _NonFinite
            return embeds

        try:
            metrics = self._kind_module.score(self, self.prepared, embed)
        except _NonFinite:
            logging.warning("eval %s: the model gives non-finite embeddings; NaN.", self.name)
            metrics = dict.fromkeys(self._kind_module.METRICS, float("nan"))
        logging.info("eval %s (%s): %.1f s", self.name, self.kind, time.perf_counter() - start)
        return {f"eval/{self.name}/{k}": float(v) for k, v in metrics.items()}


def make_evaluators(config, *, objective, tokenizer, mesh) -> list[Evaluator]:
    """One Evaluator per `config.evals` entry, sorted by name."""
    loaded = {}
    return [
        Evaluator(
            name,
            config_lib.eval_settings(config.evals[name]),
            objective=objective,
            tokenizer=tokenizer,
            mesh=mesh,
            image_size=config.model.image.size,
            context_length=config.model.text.context_length,
            max_skipped_fraction=config.data.max_skipped_fraction,
            loaded=loaded,
        )
        for name in sorted(config.evals)
    ]


def run_all(evaluators: list[Evaluator], params, model_state) -> dict[str, float]:
    """Every evaluator's metrics in one dict."""
    results = {}
    for evaluator in evaluators:
        results.update(evaluator(params, model_state))
    return results


def chance_all(evaluators: list[Evaluator]) -> dict[str, float]:
    """Every evaluator's chance levels in one dict (the metrics where one is known)."""
    return {key: v for evaluator in evaluators for key, v in evaluator.chance().items()}
