"""/api/v1/images: register (from an http(s) URL, an uploaded body, or a controller path for
admins), list, show, pre-warm on hosts, and the data download hosts use to fill their caches.

Registration is asynchronous: the web streams the file into `<state_dir>/imports/` (an admin's
raw file on the controller is linked there, not copied), checks its header (refusals are
answered 422 at once), writes the image `importing` and sends
TASK_INSPECT_IMAGE to the control queue; the control plane's image job (scheduler/imagejobs.py)
runs qemu-img, converts raw to qcow2 and makes it `active` (or `error`, with the reason). A
raw disk uploaded sparse (web/sparse.py: its data only, in frames) is converted while it
arrives, and the job then finds the qcow2. The answer is 202 with the importing image; 201
with an active one when the very same qcow2 bytes are already an active image (nothing left
to inspect).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from flask import current_app, request, send_file
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import bindparam, or_, select
from sqlalchemy.exc import IntegrityError

from fleet.exceptions import BadRequest, Conflict, NotFound, VirtfleetError
from fleet.store.models import Host, Image, Project, new_id
from web.api.schemas import (
    ImageCreateSchema,
    ImageSchema,
    ImageUploadQuerySchema,
    PrewarmAcceptedSchema,
    PrewarmSchema,
)
from web.auth import Principal, current, login_required, require_admin
from web.imports import (
    ImageTooLarge,
    Limits,
    Stash,
    StoredFile,
    request_body,
    source_stash,
    store_stream,
)
from web.sparse import CONTENT_TYPE as SPARSE_CONTENT_TYPE
from web.sparse import store_sparse

log = logging.getLogger(__name__)

blp = Blueprint("images", __name__, description="Base images VMs boot from")


class ImportUnavailable(VirtfleetError):
    """The control queue could not take the job (answered 503); nothing was kept."""

    http_status = 503


def _settings():  # type: ignore[no-untyped-def]
    return current_app.extensions["virtfleet.settings"]


def _images_dir() -> Path:
    return _settings().state_dir / "images"


def _imports_dir() -> Path:
    return _settings().state_dir / "imports"


_VISIBLE = or_(Image.project_id == bindparam("project_id"), Image.visibility == "public")
"""What a project may see of the images: its own and the public ones."""


def visible(query, who: Principal):  # type: ignore[no-untyped-def]
    if who.is_admin or who.is_host:
        return query
    return query.where(_VISIBLE).params(project_id=who.project_id)


_BY_REF = select(Image).where(or_(Image.id == bindparam("ref"), Image.name == bindparam("ref")))
_BY_REF_VISIBLE = _BY_REF.where(_VISIBLE)
"""An image by id or name (for admins and hosts), and as a project may see it: built once,
with parameters (every create looks its image up)."""


def find_image(session, ref: str, who: Principal) -> Image:  # type: ignore[no-untyped-def]
    """An image by id or name, as this principal may see it (own project first)."""
    if who.is_admin or who.is_host:
        found = session.scalars(_BY_REF, {"ref": ref}).all()
    else:
        found = session.scalars(_BY_REF_VISIBLE, {"ref": ref, "project_id": who.project_id}).all()
    found.sort(key=lambda i: (i.project_id != who.project_id, i.id != ref))
    if not found:
        raise NotFound(f"image '{ref}' not found")
    return found[0]


def ref_of(image: Image, base_url: str) -> dict[str, Any]:
    """The contract's ImageRef: what a host needs to fetch and check the image."""
    return {"id": image.id, "sha256": image.sha256, "disk_format": image.disk_format,
            "size_bytes": image.size_bytes,
            "url": f"{base_url}/api/v1/images/{image.id}/data"}


def _with_project(session, image: Image) -> Image:  # type: ignore[no-untyped-def]
    image.project_name = session.get(Project, image.project_id).name  # type: ignore[attr-defined]
    return image


def _register(who: Principal, name: str, visibility: str, source: str, stash: Stash,
              declared: str | None) -> tuple[Image, int]:
    """Store the bytes, write the image row, send the inspection; undo all of it on error."""
    if visibility == "public" and not who.is_admin:
        raise Conflict("only admins may publish public images")
    settings = _settings()
    store = current_app.extensions["virtfleet.store"]
    with store.sessions() as s:
        if s.scalars(select(Image).where(Image.project_id == who.project_id,
                                         Image.name == name)).first():
            raise Conflict(f"an image named '{name}' already exists")
    image_id = new_id()
    stored = stash(_imports_dir() / image_id,
                   Limits(settings.max_image_bytes, settings.max_virtual_bytes), declared)
    try:
        with store.session() as s:
            image = _known(s, stored) or Image(
                status="importing", sha256=stored.sha256, size_bytes=stored.size_bytes,
                virtual_size_bytes=stored.virtual_size_bytes, disk_format=stored.disk_format,
                original_format=stored.original_format or stored.disk_format)
            image.id, image.name, image.project_id = image_id, name, who.project_id
            image.visibility, image.source = visibility, source
            s.add(image)
            s.flush()
            _with_project(s, image)
    except IntegrityError:
        stored.path.unlink(missing_ok=True)
        raise Conflict(f"an image named '{name}' already exists") from None
    except BaseException:
        stored.path.unlink(missing_ok=True)
        raise
    if image.status == "active":
        stored.path.unlink(missing_ok=True)
        return image, 201
    try:
        current_app.extensions["virtfleet.dispatcher"].inspect_image(image_id)
    except Exception:
        log.exception("could not send the inspection of image %s", image_id)
        with store.session() as s:
            row = s.get(Image, image_id)
            if row is not None:
                s.delete(row)
        stored.path.unlink(missing_ok=True)
        raise ImportUnavailable("the message broker is not reachable; nothing was kept") \
            from None
    return image, 202


def _known(session, stored: StoredFile) -> Image | None:  # type: ignore[no-untyped-def]
    """An active image for these exact qcow2 bytes, already inspected and in the store: the
    new image shares its file and its findings."""
    if not stored.sha256 or not (_images_dir() / stored.sha256).is_file():
        return None
    twin = session.scalars(select(Image).where(Image.sha256 == stored.sha256,
                                               Image.status == "active")).first()
    if twin is None:
        return None
    return Image(status="active", sha256=twin.sha256, size_bytes=twin.size_bytes,
                 virtual_size_bytes=twin.virtual_size_bytes, disk_format=twin.disk_format,
                 original_format=stored.disk_format)


@blp.route("/images")
class Images(MethodView):
    decorators = [login_required()]

    @blp.response(200, ImageSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List the images this project may use."""
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            return [_with_project(s, i) for i in
                    s.scalars(visible(select(Image), current()).order_by(Image.name))]

    @blp.arguments(ImageCreateSchema)
    @blp.response(202, ImageSchema)
    @blp.alt_response(201, schema=ImageSchema, description="the same qcow2 bytes were already "
                                                           "an active image: active at once")
    def post(self, data):  # type: ignore[no-untyped-def]
        """Register an image from an http(s) URL (or, admins, a path on the controller).

        The file is fetched and its header checked now (422 when refused); qemu-img runs on
        the control plane afterwards: poll the image until `status` is `active` or `error`."""
        who = current()
        source = data["source"]
        stash = source_stash(source, allow_local=who.is_admin)
        return _register(who, data["name"], data["visibility"],
                         source if "://" in source else "local", stash, data["disk_format"])


SPARSE_DOC = (
    "a raw disk's data only, in frames: each an 8-byte big-endian offset, an 8-byte "
    "big-endian length, then that many bytes of the disk from that offset. Frames are in "
    "increasing order, do not overlap, are not empty and end inside `virtual_size`; what no "
    "frame covers reads as zeros (the header check applies to the disk's first bytes). "
    "400: a frame out of order, overlapping, empty or past the disk, or a body that ends "
    "inside a frame; 413: data above max_image_bytes; 422: `virtual_size` above "
    "max_virtual_bytes, or a disk whose first bytes are another format's. "
    "`virtfleet image upload` sends raw files so (their holes found with SEEK_HOLE).")


def request_body_checked(req, virtual_size: int | None,  # type: ignore[no-untyped-def]
                         limit: int) -> Any:
    """The upload's body as chunks, once its content type and length fit: a sparse body
    needs `virtual_size` (and a plain one must not have it); a plain body declaring more
    than max_image_bytes is refused before a byte is read (this route's own limit, not the
    app's MAX_CONTENT_LENGTH, meant for JSON; a body without a length is stopped as soon
    as it goes past it). A sparse body's data is counted as it comes."""
    sparse = req.mimetype == SPARSE_CONTENT_TYPE
    if sparse and virtual_size is None:
        raise BadRequest(f"a {SPARSE_CONTENT_TYPE} body needs the virtual_size parameter")
    if not sparse and virtual_size is not None:
        raise BadRequest(f"virtual_size is only for a {SPARSE_CONTENT_TYPE} body")
    if not sparse and (req.content_length or 0) > limit:
        raise ImageTooLarge(f"the image is larger than the limit of {limit} bytes")
    return request_body(req.environ)


@blp.route("/images/upload")
class ImageUpload(MethodView):
    decorators = [login_required()]

    @blp.arguments(ImageUploadQuerySchema, location="query")
    @blp.response(202, ImageSchema)
    @blp.alt_response(201, schema=ImageSchema, description="the same qcow2 bytes were already "
                                                           "an active image: active at once")
    @blp.doc(requestBody={
        "required": True,
        "description": "application/octet-stream: the image file (qcow2 or raw) as it is. "
                       f"{SPARSE_CONTENT_TYPE} (with `virtual_size`): {SPARSE_DOC}",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            SPARSE_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}})
    def post(self, args):  # type: ignore[no-untyped-def]
        """Register an image from the request body (streamed to disk, at most max_image_bytes).

        A raw disk may be sent sparse (`Content-Type: application/x-virtfleet-sparse`, its
        size in `virtual_size`): only its data travels, in frames, and it is converted to
        qcow2 while it arrives. Like POST /images, the answer is 202 and the image becomes
        `active` or `error`."""
        who, declared = current(), args["disk_format"]
        body = request_body_checked(request, args["virtual_size"], _settings().max_image_bytes)
        with contextlib.closing(body):  # a body left unread: its connection is not reused
            return self._store(who, args, body, declared)

    @staticmethod
    def _store(who: Any, args: dict[str, Any], body: Any, declared: str | None) -> Any:
        if args["virtual_size"] is not None:
            vsize = int(args["virtual_size"])
            return _register(who, args["name"], args["visibility"], "upload",
                             lambda dest, limits, declared: store_sparse(body, dest, limits,
                                                                         vsize, declared),
                             declared)
        return _register(who, args["name"], args["visibility"], "upload",
                         lambda dest, limits, declared: store_stream(body, dest, limits,
                                                                     declared),
                         declared)



@blp.route("/images/<image_ref>")
class ImageById(MethodView):
    decorators = [login_required()]

    @blp.response(200, ImageSchema)
    def get(self, image_ref: str):  # type: ignore[no-untyped-def]
        """Show one image (by id or name)."""
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            return _with_project(s, find_image(s, image_ref, current()))


@blp.route("/images/<image_ref>/prewarm")
class ImagePrewarm(MethodView):
    decorators = [login_required()]

    @blp.arguments(PrewarmSchema)
    @blp.response(202, PrewarmAcceptedSchema)
    def post(self, data, image_ref: str):  # type: ignore[no-untyped-def]
        """Admin: bring the image into the cache of these hosts ahead of builds.

        Each host fetches it and reports `image.cached` (its heartbeats then list it)."""
        require_admin()
        names = list(dict.fromkeys(data["hosts"]))
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            image = find_image(s, image_ref, current())
            if image.status != "active":
                raise Conflict(f"image '{image.name}' is {image.status}, not active")
            known = set(s.scalars(select(Host.name).where(Host.name.in_(names))))
            missing = [n for n in names if n not in known]
            if missing:
                raise NotFound(f"host '{missing[0]}' not found")
            payload = {"image": ref_of(image, _settings().base_url)}
        dispatcher = current_app.extensions["virtfleet.dispatcher"]
        sent: list[str] = []
        try:
            for name in names:
                dispatcher.prewarm(name, payload)
                sent.append(name)
        except Exception:
            log.exception("could not send prewarm of %s", payload["image"]["id"])
            raise ImportUnavailable(f"the message broker is not reachable (sent to "
                                    f"{len(sent)} of {len(names)} hosts)") from None
        return {"image_id": payload["image"]["id"], "sha256": payload["image"]["sha256"],
                "hosts": names}


@blp.route("/images/<image_id>/data")
class ImageData(MethodView):
    decorators = [login_required(allow_host=True)]

    @blp.response(200, content_type="application/octet-stream")
    def get(self, image_id: str):  # type: ignore[no-untyped-def]
        """Download the image file (hosts fill their caches with this)."""
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            image = find_image(s, image_id, current())
            if image.status != "active":
                raise Conflict(f"image '{image.name}' is {image.status}, not active")
            path = _images_dir() / image.sha256
        if not path.exists():
            raise NotFound("the image file is missing from the controller's store")
        return send_file(path, mimetype="application/octet-stream", conditional=True,
                         download_name=f"{image.sha256}.{image.disk_format}")

