"""The HTML page, driven by a real headless Chromium over the whole system: sign in with a
token, create a VM from the form, watch its row turn `running` through the live event stream
(no reload), read its serial console, see the API's message for a bad request, delete it.

Set VIRTFLEET_UI_SCREENSHOT_DIR to keep screenshots of the page (never committed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench.cluster import Cluster

pytestmark = pytest.mark.e2e

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402 - after the importorskip above
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
VM_NAME = "page-vm"
USER_DATA = '#!/bin/sh\necho "page-says-$((40 + 2))"\n'
T = TypeVar("T")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium from Debian's packages, in a throwaway profile removed afterwards."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="vf-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1360,1000",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        # An explicit driver path: Selenium Manager never runs, nothing is downloaded.
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        try:
            if driver is not None:
                driver.quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def page_state(driver: WebDriver) -> str:
    """What a failure message should show: the page's text and the browser's console."""
    try:
        text = driver.find_element(By.TAG_NAME, "body").text
        logs = "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser"))
    except WebDriverException as exc:
        return f"(page unreadable: {exc})"
    return f"--- page text ---\n{text}\n--- browser console ---\n{logs}"


def wait(driver: WebDriver, what: str, cond: Callable[[WebDriver], T],
         timeout: float = 15) -> T:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             f"{page_state(driver)}") from None


def visible_text(driver: WebDriver, element_id: str) -> str:
    el = driver.find_element(By.ID, element_id)
    return el.text if el.is_displayed() else ""


def vm_row(driver: WebDriver, name: str) -> dict[str, Any] | None:
    """The row of a VM as the page shows it (read in the page: no stale elements)."""
    return driver.execute_script(
        """const row = document.querySelector(`#vm-rows tr[data-vm-name="${arguments[0]}"]`);
        if (!row) return null;
        return {id: row.dataset.vmId, state: row.dataset.state,
                badge: row.querySelector('.badge').textContent,
                steps: row.querySelector('.badge').title,
                text: row.innerText};""", name)


def vm_state(driver: WebDriver, name: str) -> str | None:
    row = vm_row(driver, name)
    return row["state"] if row else None


def host_vcpus(driver: WebDriver, name: str) -> str:
    """The "used / total" vCPUs text of a host's row."""
    return driver.find_element(
        By.CSS_SELECTOR, f"#host-rows tr[data-host='{name}'] td:nth-child(3)").text.strip()


def screenshot(driver: WebDriver, name: str) -> None:
    where = os.environ.get("VIRTFLEET_UI_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        size = driver.get_window_size()
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], max(size["height"], height + 140))
        try:
            driver.save_screenshot(str(Path(where) / f"{name}.png"))
        finally:
            driver.set_window_size(size["width"], size["height"])


def sign_in(driver: WebDriver, token: str) -> None:
    field = wait(driver, "the token field", ec.visibility_of_element_located((By.ID, "token")))
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()


def api_error_lines(body: dict[str, Any]) -> list[str]:
    """What the page must show for an API error body: its message, then `field: error`."""
    lines = [body.get("message") or body["status"]]
    for location in (body.get("errors") or {}).values():
        for name, messages in location.items():
            lines.append(f"{name}: {' '.join(messages)}")
    return lines


def fill_create_form(driver: WebDriver, name: str, user_data: str = "",
                     vcpus: str = "1") -> None:
    for element_id, value in (("vm-name", name), ("vm-vcpus", vcpus), ("vm-memory", "192"),
                              ("vm-disk", "1"), ("vm-user-data", user_data)):
        field = driver.find_element(By.ID, element_id)
        field.clear()
        if value:
            field.send_keys(value)
    Select(driver.find_element(By.ID, "vm-image")).select_by_visible_text("demo")
    driver.find_element(By.ID, "create-button").click()


def test_the_page_creates_watches_and_deletes_a_vm(cluster: Cluster,
                                                   browser: WebDriver) -> None:
    driver = browser
    token = cluster.api.token
    driver.get(cluster.api.base + "/")
    assert driver.title == "virtfleet"

    # A wrong token: the API's message, and nothing kept.
    sign_in(driver, "vf_not-a-real-token")
    wait(driver, "the wrong-token message",
         lambda d: "invalid or revoked token" in visible_text(d, "signin-error"))
    assert driver.execute_script("return sessionStorage.getItem('virtfleet.token')") is None
    screenshot(driver, "signin-error")

    sign_in(driver, token)
    wait(driver, "the signed-in page", ec.visibility_of_element_located((By.ID, "app")))
    assert driver.execute_script("return sessionStorage.getItem('virtfleet.token')") == token
    driver.execute_script("window.__vfNoReload = true")
    wait(driver, "the demo image in the form", lambda d: "demo" in [
        o.text for o in d.find_elements(By.CSS_SELECTOR, "#vm-image option")])
    wait(driver, "host 'local' alive in the hosts table", lambda d: d.find_elements(
        By.CSS_SELECTOR, "#host-rows tr[data-host='local'][data-alive='true']"))
    wait(driver, "the live indicator",
         lambda d: d.find_element(By.ID, "live").get_attribute("data-live") == "on")

    # A bad create shows what the API said: its message and each field's error.
    for bad in ({"name": "Bad-Name"}, {"name": "ok-name", "vcpus": 0}):
        request = {"image": "demo", "vcpus": 1, "memory_mb": 192, "disk_gb": 1, **bad}
        answer = cluster.api.post("/vms", json=request)
        fill_create_form(driver, request["name"], vcpus=str(request["vcpus"]))
        shown = wait(driver, f"the API's error for {bad}",
                     lambda d: visible_text(d, "create-error") or None)
        for line in api_error_lines(answer.json()):
            assert line in shown, (line, shown)
        assert vm_row(driver, request["name"]) is None
        assert answer.status_code == 422, answer.text  # refused field by field, not a 500
    assert "vcpus: must be between 1 and 128" in shown, shown
    screenshot(driver, "bad-create")

    # The stream drops with the web process; the page notices and reconnects by itself.
    cluster.stop("web")
    wait(driver, "the live indicator to go off",
         lambda d: d.find_element(By.ID, "live").get_attribute("data-live") != "on")
    cluster.start("web", ["web"])
    wait(driver, "the stream to come back",
         lambda d: d.find_element(By.ID, "live").get_attribute("data-live") == "on", timeout=60)

    # A good create: the row is there at once, then goes running with no reload.
    fill_create_form(driver, VM_NAME, USER_DATA)
    row = wait(driver, "the new VM's row", lambda d: vm_row(d, VM_NAME), timeout=10)
    vm_id = row["id"]
    assert row["state"] in ("building", "running", "ready"), row
    wait(driver, "the create error to clear",
         lambda d: not d.find_element(By.ID, "create-error").is_displayed())
    state = wait(driver, "the VM to be running",
                 lambda d: vm_state(d, VM_NAME) if vm_state(d, VM_NAME) in
                 ("running", "ready", "error") else None, timeout=150)
    row = vm_row(driver, VM_NAME)
    assert state in ("running", "ready"), row
    assert row["badge"] == state and "local" in row["text"] and "192 MiB" in row["text"], row
    assert row["steps"].startswith("building"), row  # the time each state took, as a tooltip
    assert driver.execute_script("return window.__vfNoReload === true"), "the page reloaded"
    assert driver.find_element(By.ID, "live").get_attribute("data-live") == "on"
    api_view = cluster.api.get(f"/vms/{vm_id}").json()
    assert api_view["name"] == VM_NAME and api_view["memory_mb"] == 192

    # The serial console, refreshed from the page until the guest has said who it is.
    driver.find_element(
        By.CSS_SELECTOR, f"#vm-rows tr[data-vm-id='{vm_id}'] button[data-action='console']"
    ).click()
    wait(driver, "the console panel", ec.visibility_of_element_located((By.ID, "console")))
    needles = (f"virtfleet-demo: instance-id={vm_id}", "page-says-42")
    deadline = time.monotonic() + 150
    output = ""
    while time.monotonic() < deadline:
        output = driver.find_element(By.ID, "console-output").text
        if all(n in output for n in needles):
            break
        time.sleep(2)
        wait(driver, "the console refresh button", ec.element_to_be_clickable(
            (By.ID, "console-refresh"))).click()
    assert all(n in output for n in needles), f"console never showed {needles}:\n{output[-3000:]}"
    wait(driver, "the host's used vCPUs", lambda d: host_vcpus(d, "local").startswith("1 / "))
    screenshot(driver, "running")

    # Delete, confirmed in the dialog: the row vanishes by itself.
    driver.find_element(
        By.CSS_SELECTOR, f"#vm-rows tr[data-vm-id='{vm_id}'] button[data-action='delete']"
    ).click()
    alert = wait(driver, "the confirm dialog", ec.alert_is_present(), timeout=5)
    assert VM_NAME in alert.text
    alert.accept()
    wait(driver, "the row to vanish", lambda d: vm_row(d, VM_NAME) is None, timeout=90)
    cluster.api.wait_vm(vm_id, ("gone",), timeout=30)
    wait(driver, "the host's capacity given back",
         lambda d: host_vcpus(d, "local").startswith("0 / "))
    assert "the VM was deleted" in visible_text(driver, "console-status")
    assert driver.execute_script("return window.__vfNoReload === true"), "the page reloaded"
    screenshot(driver, "deleted")

    # The token never travelled in a URL; the page logged no script errors.
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat([location.href])")
    assert not [u for u in urls if token in u], urls
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "Failed to load resource" not in e["message"]]
    assert not errors, errors

    # Sign out forgets the token and shows the sign-in form again.
    driver.find_element(By.ID, "signout").click()
    wait(driver, "the sign-in form", ec.visibility_of_element_located((By.ID, "signin")))
    assert driver.execute_script("return sessionStorage.getItem('virtfleet.token')") is None
    assert not driver.find_element(By.ID, "app").is_displayed()
    assert driver.find_element(By.ID, "live").get_attribute("data-live") == "off"
