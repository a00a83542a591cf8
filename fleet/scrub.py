"""Making a message safe to show a tenant: host paths replaced, length bounded.

Used wherever an error from a host tool (qemu-img, libvirt) becomes a VM's or an image's
reason in the API.
"""

from __future__ import annotations

import re

PATH_RE = re.compile(r"(?<![\w:])/[\w.@+-]+(?:/[\w.@+-]*)*")
"""An absolute path (not the path part of a URL: `://` never precedes it)."""


def scrub(message: str, limit: int = 500) -> str:
    return PATH_RE.sub("<path>", message)[:limit]
