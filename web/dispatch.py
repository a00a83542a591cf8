"""Sending work to hosts through the message contract (Celery `send_task` by name).

Owns the web's only use of Celery. Tests of the API alone give create_app a recording
dispatcher instead; the distributed path always goes through this one.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery.exceptions import TimeoutError as CeleryTimeout

from fleet import contract as c
from fleet.celery_app import make_celery
from fleet.config import Settings


class Dispatcher(Protocol):
    def build(self, host: str, payload: dict[str, Any]) -> None: ...
    def delete(self, host: str, payload: dict[str, Any]) -> None: ...
    def action(self, host: str, payload: dict[str, Any]) -> None: ...
    def console_log(self, host: str, vm_id: str, max_bytes: int) -> str: ...
    def inspect_image(self, image_id: str) -> None: ...
    def prewarm(self, host: str, payload: dict[str, Any]) -> None: ...
    def remove_network(self, host: str, payload: dict[str, Any]) -> None: ...
    def console_info(self, host: str, vm_id: str) -> dict[str, Any]: ...


def summary(payload: dict[str, Any]) -> str:
    """What a message's headers say of its payload (Celery's `argsrepr`, which monitoring
    tools and task events show): its ids only. Celery would otherwise put the repr of the
    whole payload there, user-data (passwords in a cloud-config) and keys included, and
    making it took ~0.2 ms of the web's CPU per message."""
    ids = {k: v for k, v in payload.items()
           if k.endswith("_id") and isinstance(v, str | int) and not isinstance(v, bool)}
    vm = payload.get("vm")
    if isinstance(vm, dict) and isinstance(vm.get("id"), str):
        ids["vm_id"] = vm["id"]
    return repr([ids])


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings, "virtfleet-web")

    def _send(self, task: str, payload: dict[str, Any], queue: str) -> None:
        # ignore_result: send_task does not know the task's own setting, and would otherwise
        # subscribe to a result channel per message (never read, never let go of).
        self.app.send_task(task, args=[payload], queue=queue, ignore_result=True,
                           argsrepr=summary(payload), kwargsrepr="{}")

    def warm_up(self) -> None:
        """Finalize the app, load its result backend (every send_task makes an AsyncResult,
        which loads it: ~20 ms the first time) and open the connection its producer
        publishes on: the first message otherwise pays for all three. One try at the
        broker: the first message tries again."""
        self.app.finalize(auto=True)
        _ = self.app.backend
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=0)

    def build(self, host: str, payload: dict[str, Any]) -> None:
        self._send(c.TASK_BUILD_VM, payload, c.host_queue(host))

    def delete(self, host: str, payload: dict[str, Any]) -> None:
        self._send(c.TASK_DELETE_VM, payload, c.host_queue(host))

    def action(self, host: str, payload: dict[str, Any]) -> None:
        self._send(c.TASK_VM_ACTION, payload, c.host_queue(host))

    def inspect_image(self, image_id: str) -> None:
        self._send(c.TASK_INSPECT_IMAGE, {"image_id": image_id}, c.CONTROL_QUEUE)

    def prewarm(self, host: str, payload: dict[str, Any]) -> None:
        self._send(c.TASK_PREWARM_IMAGE, payload, c.host_queue(host))

    def remove_network(self, host: str, payload: dict[str, Any]) -> None:
        self._send(c.TASK_REMOVE_NETWORK, payload, c.host_queue(host))

    def _rpc(self, host: str, task: str, *args: Any) -> Any:
        """Ask the host and wait (10 s at most) for its answer."""
        result = self.app.send_task(task, args=list(args), queue=c.host_queue(host),
                                    ignore_result=False, expires=10)
        try:
            return result.get(timeout=10)
        except CeleryTimeout:
            raise TimeoutError(f"host {host} did not answer") from None
        finally:
            result.forget()

    def console_log(self, host: str, vm_id: str, max_bytes: int) -> str:
        return str(self._rpc(host, c.TASK_CONSOLE_LOG, vm_id, max_bytes))

    def console_info(self, host: str, vm_id: str) -> dict[str, Any]:
        return dict(self._rpc(host, c.TASK_CONSOLE_INFO, vm_id))
