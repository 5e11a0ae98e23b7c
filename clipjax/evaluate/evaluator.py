"""The evaluations run during training, on a held-out split loaded once."""

import jax
import numpy as np

from clipjax import sharding
from clipjax.data import pipeline
from clipjax.evaluate.retrieval import recall_at_k
from clipjax.evaluate.zeroshot import class_embeddings, topk_accuracy


class Evaluator:
    """Loads a held-out split once; `evaluator(params)` returns `eval/<name>/<metric>` values."""

    def __init__(self, eval_config, *, objective, tokenizer, mesh, image_size, context_length):
        self.name = eval_config.source.split(":")[0]
        data = pipeline.eval_arrays(
            eval_config.source,
            tokenizer=tokenizer,
            image_size=image_size,
            context_length=context_length,
            num_examples=eval_config.num_examples,
        )
        self.images, self.captions, self.labels = data["image"], data["text"], data["label"]
        self.num_classes = len(data["class_names"])
        prompts = [t.format(c) for c in data["class_names"] for t in data["prompt_templates"]]
        self.prompts = tokenizer.encode(prompts, context_length)
        self.mesh = mesh
        # A multiple of the data-parallel size, so every chunk splits over the batch axes.
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = -(-eval_config.batch_size // dp) * dp
        spread = sharding.batch_sharding(mesh)
        whole = sharding.replicated(mesh)

        def embed(fn):
            def run(params, model_state, x):
                return fn(params, model_state, jax.lax.with_sharding_constraint(x, spread))

            return jax.jit(run, out_shardings=whole)

        self._embed_images = embed(objective.embed_images)
        self._embed_texts = embed(objective.embed_texts)

    def _embed(self, fn, params, model_state, inputs: np.ndarray) -> np.ndarray:
        whole = sharding.replicated(self.mesh)
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            # Every process holds the whole chunk: valid for any process layout.
            chunk = jax.make_array_from_process_local_data(whole, chunk)
            out.append(np.asarray(fn(params, model_state, chunk))[: self.batch_size - pad])
        return np.concatenate(out).astype(np.float64)

    def __call__(self, params, model_state) -> dict[str, float]:
        images = self._embed(self._embed_images, params, model_state, self.images)
        captions = self._embed(self._embed_texts, params, model_state, self.captions)
        prompts = self._embed(self._embed_texts, params, model_state, self.prompts)
        accuracy = topk_accuracy(images, class_embeddings(prompts, self.num_classes), self.labels)
        metrics = {f"zeroshot_top{k}": v for k, v in accuracy.items()}
        metrics.update(recall_at_k(images, captions))
        return {f"eval/{self.name}/{k}": v for k, v in metrics.items()}
