"""The page's "Interactive" console button in headless Chromium: a console token from the API,
a websocket from the browser to the host's console server, a line typed into the demo guest's
shell and its answer shown, then disconnect and reconnect."""

from __future__ import annotations

import contextlib
import time

import pytest

from bench.cluster import Cluster
from tests.e2e.test_console import cluster, wait_console_log  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402 - after the importorskip above
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402

from tests.e2e.test_web_page import browser, sign_in, visible_text, wait  # noqa: E402,F401


def output(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "console-output").get_attribute("textContent") or ""


def type_line(driver: WebDriver, line: str) -> None:
    field = wait(driver, "the console input",
                 ec.visibility_of_element_located((By.ID, "console-input")))
    field.send_keys(line + Keys.ENTER)


def test_the_page_types_into_the_console(cluster: Cluster,  # noqa: F811
                                         browser: WebDriver) -> None:  # noqa: F811
    r = cluster.api.post("/vms", json={"name": "page-console", "image": "demo", "vcpus": 1,
                                       "memory_mb": 192, "disk_gb": 1})
    assert r.status_code == 202, r.text
    vm_id = r.json()["vm"]["id"]
    # Settled (`ready`: its host saw the ready line) before the page loads, so no late
    # vm.ready redraws the row between finding its console button and clicking it.
    assert cluster.api.wait_vm(vm_id, ("ready", "error"), timeout=120)["state"] == "ready"
    wait_console_log(cluster, vm_id, "virtfleet-demo: ready")

    driver = browser
    driver.get(cluster.api.base + "/")
    sign_in(driver, cluster.api.token)
    button = f"#vm-rows tr[data-vm-id='{vm_id}'] button[data-action='console']"
    wait(driver, "the VM's console button",
         ec.element_to_be_clickable((By.CSS_SELECTOR, button))).click()
    wait(driver, "the console panel", ec.visibility_of_element_located((By.ID, "console")))

    for attempt, n in (("first", 2), ("again", 3)):
        driver.find_element(By.ID, "console-live").click()
        wait(driver, f"the interactive console ({attempt})",
             lambda d: visible_text(d, "console-status") == "interactive")
        assert driver.find_element(By.ID, "console-live").text == "Disconnect"
        assert not driver.find_element(By.ID, "console-refresh").is_enabled()
        type_line(driver, f"echo page-$((40+{n}))")
        answer = f"\npage-{40 + n}\n"
        wait(driver, "the shell's answer", lambda d, a=answer: a in output(d), timeout=60)
        driver.find_element(By.ID, "console-live").click()  # Disconnect
        wait(driver, "the console to disconnect",
             lambda d: d.find_element(By.ID, "console-live").text == "Interactive")
        assert not driver.find_element(By.ID, "console-input-form").is_displayed()

    # Ctrl-C interrupts what runs in the guest's shell.
    driver.find_element(By.ID, "console-live").click()
    wait(driver, "the interactive console",
         lambda d: visible_text(d, "console-status") == "interactive")
    type_line(driver, "sleep 600; echo slept-$((1+1))")
    wait(driver, "the command to start", lambda d: "echo slept-$((1+1))\n" in output(d),
         timeout=30)
    # A Ctrl-C that lands while the shell still edits its line only clears that line, and
    # one that lands while sleep runs also drops what was typed after it: try again until
    # the shell answers.
    deadline = time.monotonic() + 90
    while "\nafter-4\n" not in output(driver) and time.monotonic() < deadline:
        time.sleep(1)
        driver.find_element(By.ID, "console-ctrl-c").click()
        time.sleep(1)
        type_line(driver, "echo after-$((2+2))")
        with contextlib.suppress(AssertionError):
            wait(driver, "the shell back after Ctrl-C",
                 lambda d: "\nafter-4\n" in output(d), timeout=5)
    assert "\nafter-4\n" in output(driver), output(driver)[-2000:]
    assert "\nslept-2\n" not in output(driver)

    # Deleting the VM ends the session with the server's reason.
    assert cluster.api.delete(f"/vms/{vm_id}").status_code == 202
    wait(driver, "the console to close", lambda d: "interactive console closed" in
         visible_text(d, "console-status") or "deleted" in visible_text(d, "console-status"),
         timeout=90)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "Failed to load resource" not in e["message"]]
    assert not errors, errors
