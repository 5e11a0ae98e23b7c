"""One run per workdir: a lock file naming the host and process that holds it.

`workdir/lock` is created exclusively and holds `{"host", "pid", "since"}`. A second run finds
it and stops at once with one line naming the holder. A lock whose process is gone (same host,
no such pid) is stale: it is taken over, and the log says so.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging

from clipjax.errors import ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: str) -> dict | None:
    """The lock's contents, or None if it vanished or is unreadable (a crash mid-write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir/lock` for the duration; ConfigError if a live process holds it."""
    path = os.path.join(workdir, "lock")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or (holder["host"] == me["host"] and not _alive(holder["pid"])):
                who = "unreadable" if holder is None else f"pid {holder['pid']}, not running"
                logging.warning("Taking over the stale lock %s (%s).", path, who)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            raise ConfigError(
                f"--workdir={workdir} is in use by pid {holder['pid']} on {holder['host']} "
                f"(since {since}); wait for that run to end or use another --workdir. If it is "
                f"gone (e.g. its host was preempted), delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            os.remove(path)
