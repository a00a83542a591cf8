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


def serve(settings: Settings) -> None:
    """gunicorn with `web_workers` processes of `web_threads` threads each. One process by
    default: writes to the store queue one at a time whatever the number of processes (SQLite
    has one writer), and each more process is one more writer to hand the lock to and one more
    interpreter competing for the CPUs; in a burst of 200 creates through two API processes,
    1 x 32 answered the slowest request about 40% sooner than 2 x 16."""
    from web import create_app
    _Gunicorn(create_app(settings=settings), {
        "bind": settings.web_bind, "workers": settings.web_workers,
        "threads": settings.web_threads,
        "worker_class": "gthread", "timeout": 120, "graceful_timeout": 5,
        "accesslog": "-", "loglevel": settings.log_level.lower(),
    }).run()
