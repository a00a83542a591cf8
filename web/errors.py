"""Error bodies: every error is JSON `{code, status, message, errors}` under /api, no traceback.

Maps virtfleet's own exceptions to HTTP codes; anything unexpected becomes a 500 whose body
says only that, while the traceback goes to the log.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import InternalServerError
from werkzeug.http import HTTP_STATUS_CODES

from fleet.exceptions import VirtfleetError

log = logging.getLogger(__name__)

def body(code: int, message: str, errors: dict | None = None):  # type: ignore[no-untyped-def]
    payload = {"code": code, "status": HTTP_STATUS_CODES.get(code, "Error"), "message": message,
               "errors": errors or {}}
    return jsonify(payload), code


def register(app: Flask) -> None:
    @app.errorhandler(VirtfleetError)
    def _virtfleet(exc: VirtfleetError):  # type: ignore[no-untyped-def]
        return body(exc.http_status, str(exc), getattr(exc, "errors", None))

    @app.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError):  # type: ignore[no-untyped-def]
        log.error("unhandled error on %s %s", request.method, request.path,
                  exc_info=exc.original_exception or exc)
        return body(500, "internal error; the server log has the details")
