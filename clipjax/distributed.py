"""The arguments of `jax.distributed.initialize`, from `python -m clipjax.main`'s flags: a
module without flags of its own, so that they can be checked anywhere."""

from clipjax.errors import ConfigError


def distributed_arguments(
    coordinator, num_processes, process_id, bind=None, heartbeat_timeout=30, shutdown_timeout=60
) -> dict:
    """`jax.distributed.initialize`'s arguments from the flags: the coordinator, process count
    and index all three, or none (the cluster is detected: Cloud TPU, SLURM, ...); where process
    0 listens; the heartbeat and shutdown bounds. ConfigError names what is missing or wrong."""
    bounds = {"heartbeat_timeout": heartbeat_timeout, "shutdown_timeout": shutdown_timeout}
    for flag, seconds in bounds.items():
        if seconds < 1:
            raise ConfigError(f"--{flag}={seconds} must be at least 1 (seconds).")
    arguments = {
        "heartbeat_timeout_seconds": heartbeat_timeout,
        "shutdown_timeout_seconds": shutdown_timeout,
    }
    if bind is not None:
        arguments["coordinator_bind_address"] = _address("--coordinator_bind", bind)
    given = {"--coordinator": coordinator, "--num_processes": num_processes}
    given["--process_id"] = process_id
    if all(value is None for value in given.values()):
        return arguments
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ConfigError(
            f"--distributed with --coordinator, --num_processes or --process_id needs all "
            f"three; {' and '.join(missing)} missing (or give none to detect the cluster)."
        )
    _address("--coordinator", coordinator)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
        )
    return {
        **arguments,
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }


def _address(flag: str, address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{flag}={address!r} must be HOST:PORT, e.g. localhost:8476.")
    return address
