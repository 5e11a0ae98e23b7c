"""Test set-up: 8 fake CPU devices, configured before JAX starts its backend, unoptimised CPU
code, and a compilation cache shared by the session's tests and workers (many compile the same
tiny programs)."""

import os
import tempfile

# The tests' programs are tiny and compiled once each: LLVM's optimisation passes cost more
# time than they save (a quarter of the suite's time, measured). The subprocesses that tests
# start (`python -m clipjax.main`, ...) inherit both flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

# JAX's accelerator plugins (requirements-compile.txt, for clipjax.plan) stay unused: the tests
# run on the CPU, and compile for TPUs and GPUs only through abstract devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "none")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain reads absl flags in its workers; no absl app runs under pytest.
flags.FLAGS.mark_as_parsed()

# A fresh cache per session: what a test compiles is what a later test may reuse, never a
# previous session's programs. The controlling process makes it, and pytest-xdist's workers,
# which inherit the variable, share it: what one worker compiled, the other reuses. A size
# limit turns on the cache's file lock, so that no worker reads an entry half written.
if "CLIPJAX_TEST_XLA_CACHE" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="clipjax-xla-cache-")  # removed at exit
    os.environ["CLIPJAX_TEST_XLA_CACHE"] = _CACHE.name
jax.config.update("jax_compilation_cache_dir", os.environ["CLIPJAX_TEST_XLA_CACHE"])
jax.config.update("jax_compilation_cache_max_size", 16 << 30)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module")
def tok():
    """A sentencepiece tokenizer trained on `shapes` captions (256 pieces)."""
    from clipjax.data import shapes, tokenizer

    return tokenizer.train(shapes.ShapesSource("train").captions(3000), vocab_size=256)
