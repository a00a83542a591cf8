"""/api/v1/images: register (from an http(s) URL, or a controller path for admins), list,
show, and the data download hosts use to fill their caches."""

from __future__ import annotations

from flask import current_app, send_file
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from fleet.exceptions import Conflict, NotFound
from fleet.store.models import Image, Project
from web.api.schemas import ImageCreateSchema, ImageSchema
from web.auth import Principal, current, login_required
from web.imports import import_source

blp = Blueprint("images", __name__, description="Base images VMs boot from")


def _images_dir():  # type: ignore[no-untyped-def]
    return current_app.extensions["virtfleet.settings"].state_dir / "images"


def visible(query, who: Principal):  # type: ignore[no-untyped-def]
    if who.is_admin or who.is_host:
        return query
    return query.where(or_(Image.project_id == who.project_id, Image.visibility == "public"))


def find_image(session, ref: str, who: Principal) -> Image:  # type: ignore[no-untyped-def]
    """An image by id or name, as this principal may see it (own project first)."""
    q = visible(select(Image), who).where(or_(Image.id == ref, Image.name == ref))
    found = session.scalars(q).all()
    found.sort(key=lambda i: (i.project_id != who.project_id, i.id != ref))
    if not found:
        raise NotFound(f"image '{ref}' not found")
    return found[0]


def _with_project(session, image: Image) -> Image:  # type: ignore[no-untyped-def]
    image.project_name = session.get(Project, image.project_id).name  # type: ignore[attr-defined]
    return image


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
    @blp.response(201, ImageSchema)
    def post(self, data):  # type: ignore[no-untyped-def]
        """Register an image: the file is copied into the controller's store by sha256."""
        who = current()
        if data["visibility"] == "public" and not who.is_admin:
            raise Conflict("only admins may publish public images")
        settings = current_app.extensions["virtfleet.settings"]
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            if s.scalars(select(Image).where(Image.project_id == who.project_id,
                                             Image.name == data["name"])).first():
                raise Conflict(f"an image named '{data['name']}' already exists")
        imported = import_source(data["source"], _images_dir(), settings.max_image_bytes,
                                 allow_local=who.is_admin)
        try:
            with store.session() as s:
                image = Image(name=data["name"], project_id=who.project_id,
                              visibility=data["visibility"], sha256=imported.sha256,
                              size_bytes=imported.size_bytes,
                              virtual_size_bytes=imported.virtual_size_bytes,
                              disk_format=imported.disk_format,
                              source=data["source"] if "://" in data["source"] else "local")
                s.add(image)
                s.flush()
                return _with_project(s, image)
        except IntegrityError:
            raise Conflict(f"an image named '{data['name']}' already exists") from None


@blp.route("/images/<image_ref>")
class ImageById(MethodView):
    decorators = [login_required()]

    @blp.response(200, ImageSchema)
    def get(self, image_ref: str):  # type: ignore[no-untyped-def]
        """Show one image (by id or name)."""
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            return _with_project(s, find_image(s, image_ref, current()))


@blp.route("/images/<image_id>/data")
class ImageData(MethodView):
    decorators = [login_required(allow_host=True)]

    @blp.response(200, content_type="application/octet-stream")
    def get(self, image_id: str):  # type: ignore[no-untyped-def]
        """Download the image file (hosts fill their caches with this)."""
        store = current_app.extensions["virtfleet.store"]
        with store.sessions() as s:
            image = find_image(s, image_id, current())
            path = _images_dir() / image.sha256
        if not path.exists():
            raise NotFound("the image file is missing from the controller's store")
        return send_file(path, mimetype="application/octet-stream", conditional=True,
                         download_name=f"{image.sha256}.{image.disk_format}")
