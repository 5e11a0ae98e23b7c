"""Test set-up: 8 fake CPU devices, configured before JAX starts its backend, and a compilation
cache shared by the session's tests (many compile the same tiny programs)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
from absl import flags  # noqa: E402

# Grain reads absl flags in its workers; no absl app runs under pytest.
flags.FLAGS.mark_as_parsed()

# A fresh cache per session: what a test compiles is what a later test may reuse, never a
# previous session's programs.
_CACHE = tempfile.TemporaryDirectory(prefix="clipjax-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE.name)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
