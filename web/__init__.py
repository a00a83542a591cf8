"""The web: REST API (flask-smorest), HTML pages and the live event stream.

`create_app(test_config=None)` follows the flaskr pattern. The web never imports libvirt;
it runs qemu-img only for a sparse raw upload, converted as it arrives (web/sparse.py →
scheduler/streamconvert.py → worker/images.py, the one qemu-img caller), and reaches hosts
only through the message contract.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from flask_smorest import Api

from fleet.config import Settings, load_settings
from fleet.store.session import Store

log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None,
               settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    settings = settings or load_settings()
    app.config.update(
        API_TITLE="virtfleet",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/static/swagger-ui/",
        MAX_CONTENT_LENGTH=16 * 1024 * 1024,
        API_SPEC_OPTIONS={"components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]},
    )
    if test_config:
        app.config.update(test_config)
    app.extensions["virtfleet.settings"] = settings
    app.extensions["virtfleet.store"] = app.config.get("STORE") or Store(settings.db_url)
    if "BUS" in app.config:
        app.extensions["virtfleet.bus"] = app.config["BUS"]
    else:
        from fleet.bus import Bus
        app.extensions["virtfleet.bus"] = Bus(settings.redis_url)
    if "DISPATCHER" in app.config:
        app.extensions["virtfleet.dispatcher"] = app.config["DISPATCHER"]
    else:
        from web.dispatch import CeleryDispatcher
        app.extensions["virtfleet.dispatcher"] = CeleryDispatcher(settings)

    api = Api(app)
    from web import errors
    from web.api import console, events, groups, hosts, images, jobs, placement, projects, vms
    for bp in (images.blp, vms.blp, console.blp, hosts.blp, jobs.blp, events.blp, groups.blp,
               projects.blp, placement.blp):
        api.register_blueprint(bp, url_prefix="/api/v1")
    from web.api import actions
    api.register_blueprint(actions.blp, url_prefix="/api/v1")
    from web.api import keypairs, networks
    for bp in (keypairs.blp, networks.blp):
        api.register_blueprint(bp, url_prefix="/api/v1")
    errors.register(app)

    from web import views
    app.register_blueprint(views.bp)
    return app
