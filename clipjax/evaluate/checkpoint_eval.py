"""Evaluating a saved checkpoint or a loadable model (the library side of
`python -m clipjax.evaluate`)."""

import flax.linen as nn
import jax

from clipjax import checkpoint, inference, sharding
from clipjax import config as config_lib
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.evaluate import evaluator as evaluator_lib
from clipjax.metrics import MetricsWriter
from clipjax.objectives.base import Objective
from clipjax.objectives.filip import ScoresTokens
from clipjax.step import build


def evaluate(config, workdir: str, step: int | None = None) -> tuple[int, dict, dict]:
    """Run `config.evals` on checkpoint `step` (default: the latest) of `workdir`; returns the
    step, the results (also appended to the workdir's metrics) and their chance levels."""
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate(config, workdir, sharding.data_parallel_size(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, _, abstract_state, _ = build(config, mesh)
        ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts)
        try:
            ckpt.check_compatible(abstract_state)
            state = ckpt.restore_state(abstract_state, step)
        finally:
            ckpt.close()
        if not (config.data.tokenizer.path or tokenizer_lib.saved_in(workdir)):
            raise config_lib.ConfigError(
                f"{workdir} holds no tokenizer.model; set config.data.tokenizer.path to the "
                "sentencepiece model the run was trained with."
            )
        tokenizer = tokenizer_lib.load_or_train(config.data.tokenizer, workdir, captions=())
        try:
            evaluators = evaluator_lib.make_evaluators(
                config, objective=objective, tokenizer=tokenizer, mesh=mesh
            )
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        results = evaluator_lib.run_all(evaluators, state.params, state.model_state)
        chance = evaluator_lib.chance_all(evaluators)
    step = int(state.step)
    writer = MetricsWriter(workdir)
    writer.write(step, results)
    writer.close()
    return step, results, chance


class _Towers(Objective):
    """A loaded model's embeddings, as the evaluators ask an objective for them."""

    def __init__(self, model):
        self.model = model.module


class _TokenTowers(ScoresTokens, _Towers):
    """A loaded FILIP model's: its token-wise scores as well."""

    def __init__(self, model):
        super().__init__(model)
        self.mask_padding = model.config.filip.mask_padding


def evaluate_model(config, model_path: str) -> tuple[dict, dict]:
    """Run `config.evals` on any model `clipjax.load` reads (a workdir's latest checkpoint, an
    export, an open_clip folder); the results and their chance levels. The model's own shapes
    replace `config.model`."""
    model = inference.load(model_path)
    config.model = model.config.model
    towers = _TokenTowers if model.scores_tokens else _Towers
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        try:
            evaluators = evaluator_lib.make_evaluators(
                config, objective=towers(model), tokenizer=model.tokenizer, mesh=mesh
            )
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        params = model.variables["params"]
        model_state = {k: v for k, v in model.variables.items() if k != "params"}
        results = evaluator_lib.run_all(evaluators, params, model_state)
        return results, evaluator_lib.chance_all(evaluators)
