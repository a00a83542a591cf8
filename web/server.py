"""Serving the web app with gunicorn (threads, so live event streams do not block others)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from fleet.config import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


def serve(settings: Settings, workers: int = 2, threads: int = 16) -> None:
    from web import create_app
    _Gunicorn(create_app(settings=settings), {
        "bind": settings.web_bind, "workers": workers, "threads": threads,
        "worker_class": "gthread", "timeout": 120, "graceful_timeout": 5,
        "accesslog": "-", "loglevel": settings.log_level.lower(),
    }).run()
