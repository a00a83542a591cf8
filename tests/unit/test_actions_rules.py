"""Which action a VM accepts in which state, what the 409 says, and which state an action
settles in: pure rules, no store, no libvirt."""

from __future__ import annotations

import pytest

from fleet import contract as c
from scheduler.events import (
    ACTIONS,
    LIFECYCLE_TO_STATE,
    action_allowed,
    not_allowed_message,
    settled_state,
)

EXPECTED = {
    # action: states that allow it
    "start": {"stopped", "error"},
    "stop": {"running", "ready"},
    "reboot": {"running", "ready"},
    "force_off": {"running", "ready", "stopping", "error"},
    "resize": {"stopped"},
    "snapshot_create": {"running", "ready", "stopped"},
    "snapshot_revert": {"running", "ready", "stopped"},
    "snapshot_delete": {"running", "ready", "stopped"},
    "rebuild": {"running", "ready", "stopped", "error"},
}


def test_every_action_of_the_contract_has_a_rule() -> None:
    assert set(ACTIONS) == set(EXPECTED)
    for name in ACTIONS:
        assert len(name) <= 16, "a job's kind holds 16 characters"


@pytest.mark.parametrize("action", sorted(EXPECTED))
@pytest.mark.parametrize("state", c.VM_STATES)
def test_allowed_states(action: str, state: str) -> None:
    assert action_allowed(action, state) is (state in EXPECTED[action])


def test_unknown_action_is_never_allowed() -> None:
    assert not action_allowed("explode", "running")


@pytest.mark.parametrize("action", sorted(EXPECTED))
def test_transitional_states_are_states_of_the_contract(action: str) -> None:
    during = ACTIONS[action].during
    assert during is None or during in c.VM_STATES
    assert set(ACTIONS[action].allowed) <= set(c.VM_STATES)


def test_transitional_states_match_the_design() -> None:
    during = {name: rule.during for name, rule in ACTIONS.items()}
    assert during == {"start": None, "stop": "stopping", "reboot": "rebooting",
                      "force_off": "stopping", "resize": "resizing",
                      "snapshot_create": "snapshotting", "snapshot_revert": "snapshotting",
                      "snapshot_delete": "snapshotting", "rebuild": "building"}


def test_409_message_names_the_state_and_what_allows_it() -> None:
    msg = not_allowed_message("resize", "running")
    assert "`running`" in msg and "`stopped`" in msg and "resize" in msg
    msg = not_allowed_message("stop", "stopped")
    assert "`running` or `ready`" in msg
    msg = not_allowed_message("start", "running")
    assert "`stopped`" in msg


@pytest.mark.parametrize(("observed", "previous", "action", "to"), [
    ("running", "running", "snapshot_create", "running"),
    ("running", "ready", "snapshot_create", "ready"),
    ("running", "ready", "snapshot_delete", "ready"),
    ("running", "ready", "reboot", "running"),  # booted again: not ready yet
    ("running", "ready", "rebuild", "running"),
    ("running", "ready", "snapshot_revert", "running"),
    ("running", "stopped", "start", "running"),
    ("running", "stopped", "snapshot_revert", "running"),
    ("stopped", "running", "stop", "stopped"),
    ("stopped", "ready", "snapshot_revert", "stopped"),
    ("absent", "running", "start", None),
    ("paused", "running", "snapshot_create", None),
    ("", "running", "stop", None),
])
def test_settled_state(observed: str, previous: str, action: str, to: str | None) -> None:
    assert settled_state(observed, previous, action) == to


def test_lifecycle_events_leave_actions_in_flight_alone() -> None:
    # A reboot powers the guest off and on: its `stopped` must not end the reboot.
    assert "rebooting" not in LIFECYCLE_TO_STATE["stopped"][0]
    for name, (allowed, _to) in LIFECYCLE_TO_STATE.items():
        assert "resizing" not in allowed and "snapshotting" not in allowed, name
        assert "building" not in allowed, name
    # A guest that powers itself off during a stop (or any time it runs) is stopped.
    assert {"running", "ready", "stopping"} <= set(LIFECYCLE_TO_STATE["stopped"][0])
