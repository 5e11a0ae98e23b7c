"""Test set-up: 8 fake CPU devices, configured before JAX starts its backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from absl import flags  # noqa: E402

# Grain reads absl flags in its workers; no absl app runs under pytest.
flags.FLAGS.mark_as_parsed()
