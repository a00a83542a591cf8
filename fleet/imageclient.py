"""A client of the images API: upload an image file, list, show, wait for an import to end.

Owns the client's side of the upload and the sparse body's wire format (its media type and
frame head, which web/sparse.py reads): a raw disk is sent sparse — its data extents only
(found with SEEK_DATA/SEEK_HOLE), each as a frame (8-byte big-endian offset, 8-byte length,
the bytes, sent from the page cache with sendfile(2)) — and a qcow2 as it is; on top of
fleet.apiclient (the connection, the JSON answers, a refusal as ApiError with the server's
message). Used by ``virtfleet image`` (fleet/imagecli.py) and by ``virtfleet bench
images``, so that what is measured is what users run.

Must not: judge an image (the server does; this only picks how to send it), or read a file
whole into memory.
"""

from __future__ import annotations

import errno
import http.client
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fleet.apiclient import ApiClient, ApiError, segment, wait_until

SPARSE_CONTENT_TYPE = "application/x-virtfleet-sparse"
"""The media type of a sparse body (web/sparse.py reads it)."""

FRAME = struct.Struct(">QQ")
"""A sparse body's frame head: the offset in the disk and the length of the bytes that
follow (big-endian, unsigned 64-bit)."""

QCOW2_MAGIC = b"QFI\xfb"

POLL_S = 0.5
"""Pause between two looks at an importing image."""


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


class ImageClient(ApiClient):
    """The images API of one virtfleet (``url``: its base URL) with one API token."""

    def list(self) -> list[dict[str, Any]]:
        return self.get("/images")  # type: ignore[no-any-return]

    def show(self, ref: str) -> dict[str, Any]:
        return self.get(f"/images/{segment(ref)}")  # type: ignore[no-any-return]

    def wait(self, image: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        """Poll an importing image until it is active or error (or `timeout` seconds)."""
        if image.get("status") != "importing":
            return image
        return wait_until(lambda: self.show(image["id"]),  # type: ignore[no-any-return]
                          lambda seen: seen.get("status") != "importing", timeout,
                          f"image {image['id']} importing", POLL_S)

    # -- uploads ----------------------------------------------------------------------------

    def upload(self, path: Path, name: str, visibility: str = "private",
               disk_format: str | None = None) -> dict[str, Any]:
        """Upload `path` as a new image: a raw disk sparse (its data only), a qcow2 (or a
        file that says it is one) as it is. Returns the image the server answered (202:
        importing; 201: already active)."""
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise ApiError(f"cannot read {path}: {exc.strerror}") from None
        with fh:
            fmt = disk_format or ("qcow2" if fh.read(4) == QCOW2_MAGIC else "raw")
            fd = fh.fileno()
            query: dict[str, Any] = {"name": name, "visibility": visibility}
            if disk_format:
                query["disk_format"] = disk_format
            if fmt == "raw":
                size = os.fstat(fd).st_size
                if not size:
                    raise ApiError(f"{path} is empty")
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
        conn = self.connection()
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
                        raise ApiError("the file got shorter while it was sent")
            except (ConnectionError, TimeoutError) as exc:
                sent_error = exc  # the server may have refused it early: read its answer
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ApiError(f"the upload failed: {sent_error or exc}") from None
            return self.answer(resp.status, resp.read())  # type: ignore[no-any-return]
        except OSError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        finally:
            conn.close()
