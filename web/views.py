"""HTML pages: the VM list with a create form (it talks to the JSON API with the user's
token and follows the live event stream), plus the bundled Swagger UI assets."""

from __future__ import annotations

from flask import Blueprint, abort, render_template, send_from_directory
from swagger_ui_bundle import swagger_ui_path

bp = Blueprint("views", __name__, template_folder="templates", static_folder="static",
               static_url_path="/ui-static")


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    return render_template("index.html")


@bp.get("/static/swagger-ui/<path:name>")
def swagger_assets(name: str):  # type: ignore[no-untyped-def]
    if name.endswith((".map",)):
        abort(404)
    return send_from_directory(swagger_ui_path, name)
