"""The chips `clipjax.plan` compiles for, as abstract devices: nothing runs on them.

A target is a TPU topology, `GEN:AxB[xC]` (`v5e:16x16` is 256 v5e chips), through libtpu; or
NVIDIA GPUs, `GPUxN` (`h100x8`), through JAX's CUDA plugin and a GPU target config shipped
in `gpus/` (the device description XLA compiles for: cores, memory, compute capability,
cuDNN version).
"""

import dataclasses
import importlib.util
import os
import re
from importlib import resources

from jax.experimental import topologies

from clipjax.errors import ConfigError

# HBM per chip (per device: v4 runs as one megacore device per chip), from Google's specs.
TPU_MEMORY = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
TPU_EXAMPLES = ("v5e:16x16", "v5e:2x2", "v4:4x4x4", "v5p:4x4x4", "v6e:16x16")
GPUS_PER_HOST = 8
_INSTALL = "pip install -r requirements-compile.txt (JAX's {} plugin, the version of jax)"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as asked for: "v5e:16x16", "h100x8"
    platform: str  # "tpu" or "cuda"
    chip: str  # what each device is, in words
    memory_bytes: int  # per device
    devices: tuple  # the abstract devices, in the order a mesh takes them


def gpu_names() -> list[str]:
    """The GPUs with a target config in `gpus/` (h100, h200, a100)."""
    files = resources.files("clipjax.plan").joinpath("gpus").iterdir()
    return sorted(f.name.removesuffix(".txtpb") for f in files if f.name.endswith(".txtpb"))


def known() -> str:
    """The targets one may ask for, in one phrase."""
    gpus = ", ".join(f"{g}xN" for g in gpu_names())
    return f"TPU topologies GEN:TOPOLOGY with GEN one of {', '.join(TPU_MEMORY)} (e.g. " + (
        f"{', '.join(TPU_EXAMPLES)}); NVIDIA GPUs {gpus} (e.g. h100x8)"
    )


def resolve(name: str) -> Target:
    """The abstract devices of target `name`; ConfigError naming the known targets or the
    package to install."""
    tpu = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", name)
    gpu = re.fullmatch(r"([a-z]\d+)x(\d+)", name)
    if tpu and tpu.group(1) in TPU_MEMORY:
        return _tpu(name, tpu.group(1))
    if gpu and gpu.group(1) in gpu_names() and int(gpu.group(2)) > 0:
        return _gpu(name, gpu.group(1), int(gpu.group(2)))
    raise ConfigError(f"--target={name!r} is unknown; use one of {known()}.")


def _tpu(name: str, generation: str) -> Target:
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--target={name} needs libtpu: {_INSTALL.format('TPU')}.")
    # Nothing runs on a TPU: libtpu need not look for one, nor lock it against other processes.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "none")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # v4 runs as one device per chip (megacore), as it is used in practice.
    extra = {"chip_config_name": "megacore"} if generation == "v4" else {}
    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **extra)
    except Exception as e:  # noqa: BLE001 - libtpu raises bare RuntimeErrors and XlaErrors
        raise ConfigError(f"--target={name}: libtpu does not know this topology ({e}).") from None
    kind = topology.devices[0].device_kind
    return Target(name, "tpu", kind, TPU_MEMORY[generation], tuple(topology.devices))


def _gpu(name: str, gpu: str, count: int) -> Target:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise ConfigError(f"--target={name} needs JAX's CUDA plugin: {_INSTALL.format('CUDA')}.")
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
        raise ConfigError(
            f"--target={name}: more than {GPUS_PER_HOST} GPUs come as hosts of "
            f"{GPUS_PER_HOST}; use a multiple of {GPUS_PER_HOST}."
        )
    proto = resources.files("clipjax.plan").joinpath("gpus", f"{gpu}.txtpb").read_text()
    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=proto, topology=f"1x{hosts}x{per_host}"
        )
    except Exception as e:  # noqa: BLE001 - the plugin raises XlaRuntimeErrors
        raise ConfigError(f"--target={name}: the CUDA plugin cannot describe it ({e}).") from None
    memory = int(re.search(r"device_memory_size: (\d+)", proto).group(1))
    chip = re.search(r'device_description_str: "([^"]+)"', proto).group(1)
    return Target(name, "cuda", chip, memory, tuple(topology.devices))
