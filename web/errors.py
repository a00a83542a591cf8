"""Error bodies: every error is JSON `{code, status, message, errors}` under /api, no traceback.

Maps virtfleet's own exceptions to HTTP codes; anything unexpected becomes a 500 whose body
says only that, while the traceback goes to the log.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, InternalServerError
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

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        # flask-smorest's own handler leaves out `message` (validation errors) or `errors`
        # (abort with a message); answer every HTTP error with all four keys.
        data = getattr(exc, "data", None) or {}
        errors = data.get("errors") or data.get("messages") or {}
        message = data.get("message") or _summary(errors) or exc.description or exc.name
        resp, code = body(exc.code or 500, message, errors)
        for name, value in list(exc.get_headers()) + list(dict(data.get("headers") or {})
                                                          .items()):
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp, code

    @app.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError):  # type: ignore[no-untyped-def]
        log.error("unhandled error on %s %s", request.method, request.path,
                  exc_info=exc.original_exception or exc)
        return body(500, "internal error; the server log has the details")


def _summary(errors: dict, limit: int = 5) -> str:
    """'field: problem; ...' from marshmallow's nested errors (location level skipped)."""
    flat: list[str] = []

    def walk(node: object, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + [str(key)])
        elif isinstance(node, list) and all(isinstance(x, str) for x in node):
            where = ".".join(path[1:] if path and path[0] in LOCATIONS else path)
            flat.append(f"{where}: {' '.join(node)}" if where else " ".join(node))
        elif node is not None:
            flat.append(f"{'.'.join(path)}: {node}")

    walk(errors, [])
    if not flat:
        return ""
    more = f" (and {len(flat) - limit} more)" if len(flat) > limit else ""
    return "invalid request: " + "; ".join(flat[:limit]) + more


LOCATIONS = ("json", "query", "form", "headers", "cookies", "files", "path", "view_args")
