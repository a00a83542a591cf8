"""Every exception virtfleet raises on purpose, flat in one module (rq style)."""


class VirtfleetError(Exception):
    """Base of all virtfleet errors; its message is safe to show to a user."""

    http_status = 400


class ConfigError(VirtfleetError):
    """A setting has a bad value; the message names the setting."""


class NotFound(VirtfleetError):
    """The thing does not exist, or belongs to another tenant."""

    http_status = 404


class Conflict(VirtfleetError):
    """The request does not fit the current state (no room, wrong VM state...)."""

    http_status = 409

    def __init__(self, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


class BadRequest(VirtfleetError):
    """The request is malformed in a way the schema could not catch; `errors` may say
    where (e.g. {"public_key": ["..."]})."""

    def __init__(self, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


class NoValidHost(Conflict):
    """Placement found no host; `errors` says how many hosts each filter removed."""


class BuildError(VirtfleetError):
    """A build step failed on a host; `step` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
