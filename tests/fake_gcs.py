"""A Google Cloud Storage stand-in for the tests, with no network: `gs://` paths that Python
reads through etils.epath (fsspec's in-memory filesystem under the name `gs`), and the same
objects served over HTTP as GCS's JSON API serves them, for the readers that speak it
themselves (array_record's C++ reader, pointed here by CLOUD_STORAGE_EMULATOR_ENDPOINT)."""

import contextlib
import http.server
import json
import re
import threading
import urllib.parse

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    """fsspec's memory filesystem under the name epath asks for `gs://` paths."""

    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.removeprefix("gs://"))


def install() -> None:
    """`gs://` through FakeGCS, emptied."""
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    FakeGCS.store.clear()


class _Objects(http.server.BaseHTTPRequestHandler):
    """GET /storage/v1/b/BUCKET/o/OBJECT: its metadata, or with ?alt=media its bytes (a Range
    header honoured), from FakeGCS's store."""

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urllib.parse.urlparse(self.path)
        found = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", url.path)
        stored = found and FakeGCS.store.get(f"/{found[1]}/{urllib.parse.unquote(found[2])}", None)
        if not stored:
            self.send_error(404)
            return
        data = stored.getvalue()
        if urllib.parse.parse_qs(url.query).get("alt") != ["media"]:
            body = json.dumps({"bucket": found[1], "name": found[2], "size": str(len(data))})
            self._send(200, body.encode(), {"Content-Type": "application/json"})
            return
        status, start, end = 200, 0, len(data) - 1
        if ranged := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "")):
            first, last = ranged.groups()
            if first:
                start, end = int(first), min(int(last) if last else end, end)
            else:
                start = max(0, len(data) - int(last))
            status = 206
        headers = {"x-goog-generation": "1", "x-goog-stored-content-length": str(len(data))}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, data[start : end + 1], headers)

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def served():
    """FakeGCS's objects over HTTP on a free local port; yields the endpoint URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Objects)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
