"""The one path layer: a local path or a remote one (`gs://bucket/run`, `s3://`, any scheme
etils.epath knows) alike.

Every file the trainer keeps in a workdir goes through here or through Orbax, which takes the
same `epath.Path`: checkpoints, `metrics.jsonl`, TensorBoard event files, `config.json`, the
tokenizer and the lock. Object stores cannot append or rename atomically, so whole-file writes
are single uploads there, and a growing file is rewritten whole (`GrowingFile`).

Data goes through here too: the sources' globs, files and images (`glob`, `read_bytes`), and
the converter's input and output. A local path keeps its meaning relative to the working
directory.
"""

import glob as glob_lib
import io
import os
import re
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


def local(location) -> str:
    """A local `location` with `~` expanded (relative stays relative); a remote one as given."""
    location = os.fspath(location)
    return location if is_remote(location) else os.path.expanduser(location)


def join(folder, name: str) -> str:
    """`name` inside `folder`; an absolute local or remote `name` stays as it is."""
    if is_remote(name) or os.path.isabs(name):
        return name
    folder = os.fspath(folder)
    return f"{folder.rstrip('/')}/{name}" if is_remote(folder) else os.path.join(folder, name)


def is_file(location) -> bool:
    return path(location).is_file()


def is_dir(location) -> bool:
    return path(location).is_dir()


def read_bytes(location) -> bytes:
    """The bytes of a local or remote file (OSError when it cannot be read)."""
    if is_remote(location):
        return epath.Path(location).read_bytes()
    with open(os.path.expanduser(location), "rb") as f:
        return f.read()


def open_text(location):
    """A text file for the csv module (newlines untranslated; a UTF-8 BOM dropped): a local
    one streamed, a remote one read whole."""
    if is_remote(location):
        return io.StringIO(read_bytes(location).decode("utf-8-sig"), newline="")
    return open(os.path.expanduser(location), newline="", encoding="utf-8-sig")


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_ranges(pattern: str) -> list[str]:
    """webdataset's brace ranges: `shard-{000..002}.tar` -> shard-000.tar, shard-001.tar,
    shard-002.tar (zero-padded to the first bound's width)."""
    found = _RANGE.search(pattern)
    if not found:
        return [pattern]
    first, last = found.groups()
    head, tail = pattern[: found.start()], pattern[found.end() :]
    return [
        expanded
        for number in range(int(first), int(last) + 1)
        for expanded in _expand_ranges(f"{head}{number:0{len(first)}d}{tail}")
    ]


def glob(pattern) -> list[str]:
    """The files and folders that `pattern` (wildcards `*?[]`, and ranges `{000..099}`)
    matches, sorted: local ones as `glob.glob` gives them, remote ones through epath."""
    found = set()
    for expanded in _expand_ranges(local(pattern)):
        if not is_remote(expanded):
            found.update(glob_lib.glob(expanded))
            continue
        parts = expanded.split("/")
        magic = next((i for i, part in enumerate(parts) if glob_lib.has_magic(part)), None)
        if magic is None:
            if epath.Path(expanded).exists():
                found.add(expanded)
            continue
        base = epath.Path("/".join(parts[:magic]))
        found.update(os.fspath(match) for match in base.glob("/".join(parts[magic:])))
    return sorted(found)


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
