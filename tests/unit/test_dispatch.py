"""What the web's Celery dispatcher puts in a message's headers (web/dispatch.py): the
payload goes in the body as ever; the `argsrepr` that monitoring shows names ids only."""

from __future__ import annotations

from typing import Any

from fleet import contract as c
from web.dispatch import CeleryDispatcher, summary


class App:
    """Records send_task's arguments (no broker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **kw: Any) -> None:
        self.sent.append((name, kw))


def test_a_messages_headers_name_its_ids_never_its_user_data_or_keys() -> None:
    payload = {"vm": {"id": "vm-1", "name": "web", "user_data": "#cloud-config\npassword: s3cret",
                      "ssh_keys": ["ssh-ed25519 AAAA"]}, "job_id": "job-1", "attempt": 0,
               "image": {"id": "img-1"}}
    dispatcher = CeleryDispatcher.__new__(CeleryDispatcher)
    dispatcher.app = App()  # type: ignore[assignment]
    dispatcher.build("node1", payload)
    ((name, kw),) = dispatcher.app.sent  # type: ignore[attr-defined]
    assert name == c.TASK_BUILD_VM and kw["queue"] == c.host_queue("node1")
    assert kw["args"] == [payload] and kw["ignore_result"] is True  # the body: all of it
    assert kw["argsrepr"] == "[{'job_id': 'job-1', 'vm_id': 'vm-1'}]"
    assert "s3cret" not in kw["argsrepr"] and "ssh-ed25519" not in kw["argsrepr"]
    assert kw["kwargsrepr"] == "{}"
    assert summary({"image_id": "img-2"}) == "[{'image_id': 'img-2'}]"
    assert summary({"vm_id": "vm-3", "job_id": "job-3", "action": "reboot",
                    "flag_id": True}) == "[{'vm_id': 'vm-3', 'job_id': 'job-3'}]"
