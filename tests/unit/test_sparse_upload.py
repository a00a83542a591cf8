"""Sparse raw uploads (web/sparse.py), their conversion as they arrive
(scheduler/streamconvert.py, worker.images.convert_segment), the client that sends them
(fleet/imageclient.py) and ``virtfleet image`` (fleet/imagecli.py): every protocol fault
refused with a 4xx that names no path and keeps nothing, the result equal to the source
(``qemu-img compare``) wherever its data lies, and the CLI against the app over real HTTP."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from fleet import writeback
from fleet.cli import main as cli
from fleet.imageclient import FRAME, SPARSE_CONTENT_TYPE, ImageClient, data_extents
from fleet.proc import ProcError, run
from scheduler import imagejobs, streamconvert
from tests.unit.test_images_import import (
    MARKER,
    Env,
    Recorder,
    make_env,
    needs_qemu_img,
    qcow2_header,
    qemu_img,
    secret_file,
    sparse_file,
)
from web import sparse
from worker import images

MIB = 1024 * 1024
KIB = 1024
CLUSTER = streamconvert.CLUSTER


@pytest.fixture
def env(tmp_path: Path, migrated_db: Path) -> Iterator[Env]:
    e = make_env(tmp_path, migrated_db, VIRTFLEET_MAX_IMAGE_BYTES=str(4 * MIB),
                 VIRTFLEET_MAX_VIRTUAL_BYTES=str(64 * MIB))
    yield e
    e.store.dispose()


def body(*frames: tuple[int, bytes]) -> bytes:
    return b"".join(FRAME.pack(off, len(data)) + data for off, data in frames)


def send(env: Env, data: bytes, virtual_size: int | None, name: str = "disk",
         content_type: str = SPARSE_CONTENT_TYPE, **query: Any) -> Any:
    q = {"name": name, **query}
    if virtual_size is not None:
        q["virtual_size"] = virtual_size
    qs = "&".join(f"{k}={v}" for k, v in q.items())
    return env.call("POST", f"/api/v1/images/upload?{qs}", data=data,
                    headers={"Content-Type": content_type})


def file_body(path: Path) -> bytes:
    with path.open("rb") as fh:
        fd = fh.fileno()
        return b"".join(FRAME.pack(e.offset, e.length) + os.pread(fd, e.length, e.offset)
                        for e in data_extents(fd))


def assert_equal_disks(raw: Path, qcow2: Path) -> None:
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)],
              timeout=60)
    assert b"identical" in out.stdout


# -- the protocol: every fault a 4xx, nothing kept, no path shown -----------------------------

QCOW2_HEAD = qcow2_header()

REFUSALS = [
    pytest.param(body((0, b"a" * 4096), (2048, b"b" * 10)), 8 * MIB, 400, "not overlap",
                 id="overlap"),
    pytest.param(body((8192, b"a" * 10), (4096, b"b" * 10)), 8 * MIB, 400, "in order",
                 id="out-of-order"),
    pytest.param(body((0, b"")), 8 * MIB, 400, "is empty", id="empty-frame"),
    pytest.param(body((8 * MIB - 4, b"12345")), 8 * MIB, 400, "past the disk",
                 id="past-the-end"),
    pytest.param(body((0, b"abc"))[:10], 8 * MIB, 400, "inside a frame", id="cut-in-head"),
    pytest.param(body((0, b"a" * 600))[:300], 8 * MIB, 400, "inside a frame",
                 id="cut-in-data"),
    pytest.param(body((0, b"\1" * MIB), (2 * MIB, b"\2" * MIB), (4 * MIB, b"\3" * MIB),
                      (6 * MIB, b"\4" * MIB), (7 * MIB, b"\5")), 8 * MIB, 413,
                 "larger than the limit", id="data-above-max-image-bytes"),
    pytest.param(body((0, b"a")), 65 * MIB, 422, "above the limit", id="virtual-too-large"),
    pytest.param(b"", 0, 422, "", id="virtual-size-zero"),
    pytest.param(body((0, QCOW2_HEAD)), 8 * MIB, 422, "qcow2 image, not raw",
                 id="qcow2-header-at-0"),
    pytest.param(body((0, QCOW2_HEAD[:3]), (3, QCOW2_HEAD[3:])), 8 * MIB, 422,
                 "qcow2 image, not raw", id="qcow2-header-across-frames"),
    pytest.param(body((0, b"KDMV" + bytes(60))), 8 * MIB, 422, "VMDK", id="vmdk-header"),
    pytest.param(body((64, b"\x7f\x10\xda\xbe")), 8 * MIB, 422, "VDI",
                 id="vdi-signature-after-a-hole"),
]


@pytest.mark.parametrize(("data", "vsize", "status", "message"), REFUSALS)
def test_a_bad_sparse_body_is_refused_and_nothing_is_kept(env: Env, data: bytes, vsize: int,
                                                          status: int, message: str) -> None:
    before = threading.active_count()
    resp = send(env, data, vsize)
    assert resp.status_code == status, resp.get_json()
    text = resp.get_json()["message"]
    assert message in text and str(env.state_dir) not in text and "/tmp" not in text
    env.assert_nothing_stored()
    assert threading.active_count() == before
    assert env.dispatcher.calls == []


def test_the_content_type_and_virtual_size_go_together(env: Env) -> None:
    resp = send(env, body((0, b"a")), None)
    assert resp.status_code == 400 and "needs the virtual_size" in resp.get_json()["message"]
    resp = send(env, b"a", 8 * MIB, content_type="application/octet-stream")
    assert resp.status_code == 400 and "only for a" in resp.get_json()["message"]
    resp = send(env, body((0, b"a")), 8 * MIB, disk_format="qcow2")
    assert resp.status_code == 422 and "raw disk" in resp.get_json()["message"]
    env.assert_nothing_stored()


def test_a_raw_header_that_names_a_host_file_never_gets_in(env: Env, tmp_path: Path) -> None:
    """A qcow2 with a backing file on the host, sent as a sparse "raw" disk: refused from its
    header (the first frame), the host file's bytes nowhere."""
    secret = secret_file(tmp_path / "secret")
    hostile = tmp_path / "hostile.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(hostile))
    resp = send(env, file_body(hostile), 8 * MIB)
    assert resp.status_code == 422
    env.assert_nothing_stored()
    env.assert_marker_absent()
    assert MARKER not in resp.data


def test_the_openapi_doc_describes_the_sparse_body(env: Env) -> None:
    op = env.client.get("/api/v1/openapi.json").get_json()[
        "paths"]["/api/v1/images/upload"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/octet-stream",
                                                 SPARSE_CONTENT_TYPE}
    assert "8-byte big-endian offset" in op["requestBody"]["description"]
    assert "virtual_size" in [p["name"] for p in op["parameters"]]


@pytest.mark.parametrize("cut", [1, 7, 16, 17, 4096 + 3])
def test_frames_are_read_the_same_however_the_body_is_cut(cut: int) -> None:
    data = body((0, os.urandom(5000)), (8192, b"x"), (3 * 65536 + 1, os.urandom(70000)))
    chunks = [data[i:i + cut] for i in range(0, len(data), cut)]
    got: dict[int, bytearray] = {}
    end = -1
    for off, piece in sparse.frames(chunks, 1 << 20):
        if off != end:
            got[off] = bytearray()
            start = off
        got[start] += piece
        end = off + len(piece)
    assert {k: bytes(v) for k, v in got.items()} == {
        0: data[16:5016], 8192: b"x", 3 * 65536 + 1: data[-70000:]}


# -- the conversion as the data arrives ---------------------------------------------------------


@needs_qemu_img
@pytest.mark.parametrize("size", [16 * MIB + 3 * CLUSTER + 1000, 8 * MIB])
def test_a_sparse_upload_converted_in_segments_equals_its_source(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Data in the first cluster, at the very last byte, straddling segment boundaries, and
    a disk whose size is not a multiple of the cluster (nor of a sector): the stored qcow2
    reads as the source."""
    monkeypatch.setattr(streamconvert, "SEGMENT_DATA", 256 * KIB)
    segments: list[tuple[int, int]] = []
    real = images.convert_segment

    def spy(src: Path, dst: Path, offset: int, length: int, **kw: Any) -> None:
        segments.append((offset, length))
        real(src, dst, offset, length, **kw)

    monkeypatch.setattr(images, "convert_segment", spy)
    raw = sparse_file(tmp_path / "disk.raw", size, {
        0: b"\xeb\x63\x90" + os.urandom(700),  # the first cluster: a boot sector
        CLUSTER - 100: os.urandom(300),  # across the first cluster's end
        MIB - 7: os.urandom(600 * KIB),  # across segment cuts
        3 * MIB: bytes(256 * KIB) + os.urandom(5),  # zeros sent as data
        5 * MIB + 1: os.urandom(2 * MIB),
        size - 1: b"\x5a",  # the very last byte
    })
    resp = send(env, file_body(raw), size)
    assert resp.status_code == 202, resp.get_json()
    image = resp.get_json()
    rounded = -(-size // 512) * 512
    assert (image["status"], image["original_format"], image["disk_format"],
            image["virtual_size_bytes"]) == ("importing", "raw", "qcow2", rounded)
    assert len(segments) >= 4
    assert all(off % CLUSTER == 0 for off, _ in segments)
    assert [off for off, _ in segments] == sorted({off for off, _ in segments})
    assert all(a + n == b for (a, n), (b, _) in zip(segments, segments[1:], strict=False))
    assert segments[-1][0] + segments[-1][1] == rounded
    imports = env.state_dir / "imports"
    assert [p.name for p in imports.iterdir()] == [image["id"]]  # no staging file left
    env.run_jobs()
    done = env.image(image["id"])
    assert (done["status"], done["virtual_size_bytes"]) == ("active", rounded), done
    stored = env.state_dir / "images" / done["sha256"]
    assert_equal_disks(raw, stored)
    assert list(imports.iterdir()) == []
    info = images.info(stored, "qcow2")
    assert "backing-filename" not in info and info["virtual-size"] == rounded


@needs_qemu_img
def test_an_empty_disk_and_a_disk_of_one_frame(env: Env, tmp_path: Path) -> None:
    resp = send(env, b"", 3 * MIB, name="blank")
    assert resp.status_code == 202, resp.get_json()
    raw = sparse_file(tmp_path / "one.raw", 2 * MIB, {MIB: b"only this"})
    resp2 = send(env, file_body(raw), 2 * MIB, name="one")
    assert resp2.status_code == 202
    env.run_jobs()
    blank, one = env.image(resp.get_json()["id"]), env.image(resp2.get_json()["id"])
    assert blank["status"] == one["status"] == "active"
    assert_equal_disks(sparse_file(tmp_path / "blank.raw", 3 * MIB, {}),
                       env.state_dir / "images" / blank["sha256"])
    assert_equal_disks(raw, env.state_dir / "images" / one["sha256"])


@needs_qemu_img
def test_a_failed_conversion_is_a_500_and_leaves_nothing(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamconvert, "SEGMENT_DATA", 64 * KIB)
    calls = []
    real = images.convert_segment

    def failing(src: Path, dst: Path, offset: int, length: int, **kw: Any) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise ProcError("qemu-img", 1, f"boom: {src}", ["qemu-img", "convert", str(src)])
        real(src, dst, offset, length, **kw)

    monkeypatch.setattr(images, "convert_segment", failing)
    raw = sparse_file(tmp_path / "d.raw", 4 * MIB, {i * 256 * KIB: os.urandom(100 * KIB)
                                                    for i in range(12)})
    before = threading.active_count()
    resp = send(env, file_body(raw), 4 * MIB)
    assert resp.status_code == 500
    message = resp.get_json()["message"]
    assert "could not be converted" in message and str(env.state_dir) not in message
    assert len(calls) >= 2
    env.assert_nothing_stored()
    assert threading.active_count() == before
    assert env.dispatcher.calls == []


@needs_qemu_img
def test_a_converted_upload_the_job_refuses_ends_in_error_and_leaves_nothing(
        env: Env, tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "d.raw", 2 * MIB, {0: os.urandom(4096)})
    image = send(env, file_body(raw), 2 * MIB).get_json()
    stored = env.state_dir / "imports" / image["id"]
    stored.write_bytes(b"not a qcow2 any more")  # what the job must find out
    env.run_jobs()
    done = env.image(image["id"])
    assert done["status"] == "error" and done["status_reason"]
    assert str(env.state_dir) not in done["status_reason"]
    assert list((env.state_dir / "imports").iterdir()) == []
    assert [p for p in (env.state_dir / "images").iterdir()] == []


@needs_qemu_img
def test_convert_segment_names_its_formats_and_escapes_commas(tmp_path: Path) -> None:
    d = tmp_path / "a,b=c"
    d.mkdir()
    raw = sparse_file(d / "s,rc.raw", MIB, {CLUSTER: os.urandom(CLUSTER)})
    out = d / "o,ut.qcow2"
    assert images.create_empty_qcow2(out, MIB) == MIB
    images.convert_segment(raw, out, CLUSTER, CLUSTER)
    assert_equal_disks(raw, out)
    with pytest.raises(FileExistsError):
        images.create_empty_qcow2(out, MIB)
    with pytest.raises(ValueError):
        images.convert_segment(raw, out, 100, CLUSTER)


# -- the client and the CLI, over real HTTP -----------------------------------------------------


class JobRecorder(Recorder):
    """Runs each import's job at once on the image runner (as the scheduler would)."""

    runner: imagejobs.Runner | None = None

    def inspect_image(self, image_id: str) -> None:
        super().inspect_image(image_id)
        if self.runner is not None:
            self.runner.submit(image_id)


@pytest.fixture
def served(tmp_path: Path, migrated_db: Path) -> Iterator[tuple[Env, str, list[dict]]]:
    """The app behind a real HTTP server on loopback, its jobs run by an image runner, and
    what each request declared (content type and length)."""
    e = make_env(tmp_path, migrated_db, VIRTFLEET_MAX_VIRTUAL_BYTES=str(256 * MIB))
    recorder = JobRecorder()
    recorder.runner = imagejobs.Runner(e.store, e.settings, publish=lambda _ev: None)
    e.app.extensions["virtfleet.dispatcher"] = recorder
    e.dispatcher = recorder
    seen: list[dict] = []
    inner = e.app.wsgi_app

    def spy(environ: dict, start_response: Any) -> Any:
        seen.append({"method": environ["REQUEST_METHOD"],
                     "type": environ.get("CONTENT_TYPE", ""),
                     "length": int(environ.get("CONTENT_LENGTH") or 0)})
        return inner(environ, start_response)

    e.app.wsgi_app = spy  # type: ignore[method-assign]
    server = make_server("127.0.0.1", 0, e.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield e, f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        recorder.runner.shutdown()
        e.store.dispose()


@needs_qemu_img
def test_the_client_sends_a_raw_disk_s_data_only(served: Any, tmp_path: Path) -> None:
    env, url, seen = served
    raw = sparse_file(tmp_path / "big.raw", 128 * MIB, {0: os.urandom(MIB),
                                                       100 * MIB: os.urandom(5),
                                                       128 * MIB - 3: b"end"})
    image = ImageClient(url, env.tokens["root"]).upload(raw, "big")
    assert image["status"] == "importing" and image["original_format"] == "raw"
    assert (seen[-1]["method"], seen[-1]["type"]) == ("POST", SPARSE_CONTENT_TYPE)
    assert seen[-1]["length"] < 2 * MIB  # not the 128 MiB of the file
    done = ImageClient(url, env.tokens["root"]).wait(image, timeout=60)
    assert done["status"] == "active", done
    assert_equal_disks(raw, env.state_dir / "images" / done["sha256"])


@needs_qemu_img
def test_cli_upload_wait_and_list(served: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env, url, seen = served
    monkeypatch.setenv("VIRTFLEET_URL", url)
    monkeypatch.setenv("VIRTFLEET_TOKEN", env.tokens["alice"])
    runner = CliRunner()
    raw = sparse_file(tmp_path / "disk.raw", 32 * MIB, {0: os.urandom(64 * KIB),
                                                       20 * MIB: os.urandom(3 * MIB)})
    res = runner.invoke(cli, ["image", "upload", str(raw), "--name", "mine", "--wait"])
    assert res.exit_code == 0, res.output
    image_id, name, status = res.output.split()
    assert (name, status) == ("mine", "active")
    posts = [r for r in seen if r["method"] == "POST"]
    assert [r["type"] for r in posts] == [SPARSE_CONTENT_TYPE]
    qcow2 = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", str(qcow2), "16M")
    res = runner.invoke(cli, ["image", "upload", str(qcow2), "--name", "q", "--json"])
    assert res.exit_code == 0, res.output
    assert '"status": "importing"' in res.output
    assert [r["type"] for r in seen if r["method"] == "POST"][-1] == \
        "application/octet-stream"
    res = runner.invoke(cli, ["image", "list"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert any(line.startswith(image_id) and "mine" in line and "active" in line
               and "32.0 MiB" in line for line in lines)
    assert any(" debian " in f" {line} " for line in lines)  # alice's project's image


@needs_qemu_img
def test_cli_errors_are_one_line_messages(served: Any, tmp_path: Path) -> None:
    env, url, _ = served
    runner = CliRunner()
    root = ["--url", url, "--token", env.tokens["root"]]
    res = runner.invoke(cli, ["image", "upload", str(tmp_path / "nope.raw"), "--name", "x",
                              *root])
    assert res.exit_code == 2 and "does not exist" in res.output
    raw = sparse_file(tmp_path / "d.raw", MIB, {0: b"x"})
    res = runner.invoke(cli, ["image", "list", "--url", url, "--token", "wrong"])
    assert res.exit_code == 1 and res.output.startswith("Error: 401")
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["image", "upload", str(raw), "--name", "Bad Name", *root])
    assert res.exit_code == 1 and ("Error: 422" in res.output or "Error: 400" in res.output)
    res = runner.invoke(cli, ["image", "upload", str(raw), "--name", "x", "--format", "qcow2",
                              *root])
    assert res.exit_code == 1 and "not qcow2 as declared" in res.output
    secret = secret_file(tmp_path / "secret")
    hostile = tmp_path / "hostile.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(hostile))
    res = runner.invoke(cli, ["image", "upload", str(hostile), "--name", "h", *root])
    assert res.exit_code == 1 and "backing file" in res.output
    res = runner.invoke(cli, ["image", "list", "--url", "http://127.0.0.1:1", "--token", "t"])
    assert res.exit_code == 1 and res.output.startswith("Error: cannot reach")
    res = runner.invoke(cli, ["image", "list", "--url", "ftp://x", "--token", "t"])
    assert res.exit_code == 1 and "not an http(s) URL" in res.output
    env.assert_marker_absent()


def test_a_punched_range_is_a_hole_and_the_file_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4 * CLUSTER))
    fd = os.open(path, os.O_RDWR)
    try:
        assert writeback.punch_hole(fd, CLUSTER, 2 * CLUSTER)
        assert not writeback.punch_hole(fd, 0, 0)
    finally:
        os.close(fd)
    content = path.read_bytes()
    assert len(content) == 4 * CLUSTER and content[CLUSTER:3 * CLUSTER] == bytes(2 * CLUSTER)
    assert path.stat().st_blocks * 512 <= 2 * CLUSTER
