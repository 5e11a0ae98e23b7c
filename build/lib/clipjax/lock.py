"""One run per workdir: a lock file naming the host and process that holds it.

`workdir/lock` is created exclusively and holds `{"host", "pid", "since"}`. A second run finds
it and stops at once with one line naming the holder. A lock whose process is gone (same host,
no such pid) is stale: it is taken over, and the log says so. On an object store (a `gs://`
workdir) "exclusively" is a check and then a write, which two runs started at the same instant
could both pass.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging
from etils import epath

from clipjax import paths
from clipjax.errors import ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: epath.Path) -> dict | None:
    """The lock's contents, or None if it vanished or is unreadable (a crash mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _create(path: epath.Path, text: str) -> None:
    """Write `path` only if it does not exist; FileExistsError if it does."""
    if paths.is_remote(path):
        if path.exists():
            raise FileExistsError(path)
        path.write_text(text)
        return
    with open(os.fspath(path), "x") as f:  # O_EXCL: atomic on a local disk
        f.write(text)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir/lock` for the duration; ConfigError if a live process holds it."""
    path = paths.path(workdir) / "lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    while True:
        try:
            _create(path, json.dumps(me))
        except FileExistsError:
            holder = _holder(path)
            if holder is None or (holder["host"] == me["host"] and not _alive(holder["pid"])):
                who = "unreadable" if holder is None else f"pid {holder['pid']}, not running"
                logging.warning("Taking over the stale lock %s (%s).", path, who)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            raise ConfigError(
                f"--workdir={workdir} is in use by pid {holder['pid']} on {holder['host']} "
                f"(since {since}); wait for that run to end or use another --workdir. If it is "
                f"gone (e.g. its host was preempted), delete {path}."
            ) from None
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink()
