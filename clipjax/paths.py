"""The one path layer for workdirs: a local folder or a remote one (`gs://bucket/run`, `s3://`,
any scheme etils.epath knows) alike.

Every file the trainer keeps in a workdir goes through here or through Orbax, which takes the
same `epath.Path`: checkpoints, `metrics.jsonl`, TensorBoard event files, `config.json`, the
tokenizer and the lock. Object stores cannot append or rename atomically, so whole-file writes
are single uploads there, and a growing file is rewritten whole (`GrowingFile`).
"""

import io
import os
import shutil
import uuid

from etils import epath


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def path(location) -> epath.Path:
    """`location` as an epath.Path; a local one absolute (Orbax needs that) and `~` expanded."""
    location = os.fspath(location)
    if is_remote(location):
        return epath.Path(location)
    return epath.Path(os.path.abspath(os.path.expanduser(location)))


def free_bytes(location) -> int | None:
    """Bytes free on the filesystem that holds `location` (or its nearest existing parent);
    None for a remote location, whose space is not known."""
    if is_remote(location):
        return None
    folder = path(location)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def write_atomic(target: epath.Path, data: bytes) -> None:
    """Write `target` whole or not at all: locally through a temporary sibling renamed over it;
    remotely in one upload, which an object store applies whole."""
    if is_remote(target):
        target.write_bytes(data)
        return
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_bytes(data)
    temporary.replace(target)


class GrowingFile:
    """A text file that grows by appends (`metrics.jsonl`): appended in place on a local disk;
    on an object store its text is kept and uploaded whole after each append."""

    def __init__(self, target: epath.Path):
        self.target = target
        text = target.read_text() if target.exists() else ""
        self.dropped = ""  # a last line cut mid-write by a kill, removed so appends stay whole
        if text and not text.endswith("\n"):
            head, newline, self.dropped = text.rpartition("\n")
            text = head + newline
            write_atomic(target, text.encode())
        if is_remote(target):
            self._file = None
            self._text = text
        else:
            self._file = target.open("a")

    def append(self, text: str) -> None:
        if self._file is None:
            self._text += text
            self.target.write_text(self._text)
        else:
            self._file.write(text)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _RemoteEventFile:
    """tensorboardX's record writer for a remote path: the event file's bytes, uploaded whole
    on each flush (scalar event files stay small)."""

    def __init__(self, location: str):
        self._target, self._buffer = epath.Path(location), io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._target.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RemoteEventFiles:
    """The factory tensorboardX asks for a scheme's writers (`register_writer_factory`)."""

    def open(self, location: str) -> _RemoteEventFile:
        return _RemoteEventFile(location)

    def directory_check(self, location: str) -> None:
        epath.Path(location).mkdir(parents=True, exist_ok=True)


def tensorboard_dir(workdir: epath.Path) -> str:
    """`workdir/tensorboard`, for tensorboardX's SummaryWriter; a remote scheme's event files
    are written through epath."""
    if is_remote(workdir):
        from tensorboardX import record_writer  # here: Grain workers import this module

        scheme = os.fspath(workdir).split("://")[0]
        record_writer.register_writer_factory(scheme, _RemoteEventFiles())
    return os.fspath(workdir / "tensorboard")
