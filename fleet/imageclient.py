"""A client of the images API: upload an image file, list, show, wait for an import to end.

Owns the client's side of the upload and the sparse body's wire format (its media type and
frame head, which web/sparse.py reads): a raw disk is sent sparse — its data extents only
(found with SEEK_DATA/SEEK_HOLE), each as a frame (8-byte big-endian offset, 8-byte length,
the bytes, sent from the page cache with sendfile(2)) — and a qcow2 as it is. What the
server answers is returned as it is (its JSON); a refusal raises :class:`ImageClientError`
with the server's message. Used by ``virtfleet image`` (fleet/cli.py) and by ``virtfleet
bench images``, so that what is measured is what users run.

Must not: judge an image (the server does; this only picks how to send it), or read a file
whole into memory.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

SPARSE_CONTENT_TYPE = "application/x-virtfleet-sparse"
"""The media type of a sparse body (web/sparse.py reads it)."""

FRAME = struct.Struct(">QQ")
"""A sparse body's frame head: the offset in the disk and the length of the bytes that
follow (big-endian, unsigned 64-bit)."""

QCOW2_MAGIC = b"QFI\xfb"

TIMEOUT = 600.0
"""Seconds a request may go without progress (an upload's answer comes after the last byte
is converted or stored)."""

POLL_S = 0.5
"""Pause between two looks at an importing image."""


class ImageClientError(Exception):
    """The request could not be made or was refused; the message says why (the server's
    message when it answered)."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


def data_extents(fd: int) -> list[Extent]:
    """The data extents of an open file (SEEK_DATA/SEEK_HOLE), in order; the whole file where
    the file system does not tell holes apart."""
    size = os.fstat(fd).st_size
    out: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                break
            return [Extent(0, size)] if size else []
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append(Extent(start, end - start))
        pos = end
    return out


class ImageClient:
    """The images API of one virtfleet (``url``: its base URL) with one API token."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageClientError(f"not an http(s) URL: {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self._parts = parts

    # -- plain requests ---------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/v1/images")

    def get(self, ref: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/images/{ref}")

    def wait(self, image: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        """Poll an importing image until it is active or error (or `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while image.get("status") == "importing":
            if time.monotonic() > deadline:
                raise ImageClientError(f"image {image['id']} still importing after "
                                       f"{timeout:.0f} s")
            time.sleep(POLL_S)
            image = self.get(image["id"])
        return image

    # -- uploads ----------------------------------------------------------------------------

    def upload(self, path: Path, name: str, visibility: str = "private",
               disk_format: str | None = None) -> dict[str, Any]:
        """Upload `path` as a new image: a raw disk sparse (its data only), a qcow2 (or a
        file that says it is one) as it is. Returns the image the server answered (202:
        importing; 201: already active)."""
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise ImageClientError(f"cannot read {path}: {exc.strerror}") from None
        with fh:
            fmt = disk_format or ("qcow2" if fh.read(4) == QCOW2_MAGIC else "raw")
            fd = fh.fileno()
            query: dict[str, Any] = {"name": name, "visibility": visibility}
            if disk_format:
                query["disk_format"] = disk_format
            if fmt == "raw":
                size = os.fstat(fd).st_size
                if not size:
                    raise ImageClientError(f"{path} is empty")
                extents = data_extents(fd)
                query["virtual_size"] = size
                return self._send(query, SPARSE_CONTENT_TYPE, fh,
                                  [(FRAME.pack(e.offset, e.length), e) for e in extents])
            return self._send(query, "application/octet-stream", fh,
                              [(b"", Extent(0, os.fstat(fd).st_size))])

    def _send(self, query: dict[str, Any], content_type: str, fh: Any,
              parts: list[tuple[bytes, Extent]]) -> dict[str, Any]:
        """POST the body made of `parts` (each: bytes, then an extent of `fh` sent with
        sendfile) and return the answer."""
        length = sum(len(head) + e.length for head, e in parts)
        conn = self._connection()
        try:
            conn.putrequest("POST", f"/api/v1/images/upload?{urlencode(query)}")
            for key, value in (("Authorization", f"Bearer {self.token}"),
                               ("Content-Type", content_type),
                               ("Content-Length", str(length)), ("Accept", "application/json")):
                conn.putheader(key, value)
            sent_error: OSError | None = None
            try:
                conn.endheaders()
                sock = conn.sock
                assert sock is not None
                for head, extent in parts:
                    sock.sendall(head)
                    if extent.length and sock.sendfile(fh, extent.offset,
                                                       extent.length) != extent.length:
                        raise ImageClientError("the file got shorter while it was sent")
            except (ConnectionError, TimeoutError) as exc:
                sent_error = exc  # the server may have refused it early: read its answer
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ImageClientError(f"the upload failed: {sent_error or exc}") from None
            return self._answer(resp.status, resp.read())
        except OSError as exc:
            raise ImageClientError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        finally:
            conn.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _json(self, method: str, path: str) -> Any:
        conn = self._connection()
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {self.token}",
                                                "Accept": "application/json"})
            resp = conn.getresponse()
            return self._answer(resp.status, resp.read())
        except OSError as exc:
            raise ImageClientError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:
            raise ImageClientError(f"bad answer from {self.url}: {exc!r}") from None
        finally:
            conn.close()

    @staticmethod
    def _answer(status: int, body: bytes) -> Any:
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None
        if status >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            raise ImageClientError(f"{status}: {message or body[:200].decode(errors='replace')}")
        if data is None:
            raise ImageClientError(f"{status}: the answer is not JSON")
        return data

