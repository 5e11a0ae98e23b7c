"""`clipjax.tools.step_profile`: HLO instructions put in the right category, and a real trace's
thunk time summed by them."""

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.tools import step_profile


def _program(a, b, idx):
    product = jnp.tanh(a @ b)
    moved = jnp.transpose(a.reshape(8, 16, 32), (2, 0, 1))
    scattered = jnp.zeros((64, 32)).at[idx].add(b[: len(idx)])
    return product, moved, product.sum(axis=0), scattered


def _inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 128, 32)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b[:32]), jnp.asarray(rng.integers(0, 64, 16))


def test_categories_of_a_compiled_program():
    compiled = jax.jit(_program).lower(*_inputs()).compile()
    categories = step_profile.categorize(compiled.as_text())
    by_source = {}
    for category, source in categories.values():
        for op in ("dot_general", "transpose", "reduce_sum", "scatter-add"):
            if source.endswith(op):
                by_source.setdefault(op, set()).add(category)
    # Each op's instructions: the product's thunk is a matmul, the transpose's a pure move
    # of data, the column sums a reduction, the scatter a scatter (each may be fused with
    # elementwise neighbours, but never called something else).
    assert "matmul" in by_source["dot_general"]
    assert by_source["transpose"] <= {"layout"}
    assert "reduction" in by_source["reduce_sum"]
    assert "scatter" in by_source["scatter-add"]
    assert set(c for c, _ in categories.values()) <= set(step_profile.CATEGORIES)


def test_summary_of_a_real_trace_adds_up(tmp_path):
    fn = jax.jit(_program)
    inputs = _inputs()
    jax.block_until_ready(fn(*inputs))
    steps = 3
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn(*inputs))
    seconds = step_profile.thunk_seconds(str(tmp_path))
    text = fn.lower(*inputs).compile().as_text()
    assert seconds and set(seconds) <= set(step_profile.categorize(text))
    summary = step_profile.summarize(text, seconds, steps, top=3)
    shares = [v["share"] for v in summary["by_category"].values()]
    np.testing.assert_allclose(sum(shares), 1.0, rtol=1e-9)
    np.testing.assert_allclose(summary["thunk_s_per_step"], sum(seconds.values()) / steps)
    assert len(summary["top_ops"]) == min(3, len(seconds))
    assert summary["top_ops"][0]["s_per_step"] == max(seconds.values()) / steps


def test_overlapping_thunks_share_the_time(tmp_path):
    """a runs 0–10 µs and 20–23 µs, b 4–6 µs on another thread: a gets 4 + 1 + 4 + 3, b 1."""
    import gzip
    import json

    events = [
        {"ph": "X", "ts": 0.0, "dur": 10.0, "name": "a", "args": {"hlo_op": "a"}},
        {"ph": "X", "ts": 4.0, "dur": 2.0, "name": "b", "args": {"hlo_op": "b"}},
        {"ph": "X", "ts": 20.0, "dur": 3.0, "name": "a", "args": {"hlo_op": "a"}},
        {"ph": "X", "ts": 1.0, "dur": 1.0, "name": "python call"},  # no hlo_op: not a thunk
    ]
    with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    seconds = step_profile.thunk_seconds(str(tmp_path))
    np.testing.assert_allclose(seconds["a"], 12e-6)
    np.testing.assert_allclose(seconds["b"], 1e-6)
