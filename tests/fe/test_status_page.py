"""The status page (tcpha.fe.status) in a real browser: Debian's headless Chromium driven by selenium
through Debian's chromedriver, against a front end in a namespace lab.

Chromium runs in the root namespace; the page's port inside the front end's namespace is reached through
tcpha.lab.forward (a root-namespace listener relaying into the lab), the same way `tcpha-lab demo --keep`
shows the page to a person. Waits are for events (the page's DOM, the control socket), never sleeps.

TCPHA_STATUS_SCREENSHOT=PATH saves the screenshot taken under load there (docs/status-page.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tcpha.lab.forward import expose
from tcpha.lab.http import start_http
from tests.deployment import Prod
from tests.support import wait_until

pytestmark = pytest.mark.netns

STATUS_PORT = 8404
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if CHROMIUM is None or CHROMEDRIVER is None:                       # pragma: no cover
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/install-deps)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service            # noqa: E402
from selenium.webdriver.common.by import By                      # noqa: E402


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # Without these Chromium reaches for the network (updates, sync, field trials) at start.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1300,800"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def start(prod: Prod, **fe) -> str:
    """Deploy with the status page on, and return its URL in the root namespace."""
    prod.start(fe={"metrics": f"127.0.0.1:{STATUS_PORT}", "dtcinterval": 1, "fall": 1, "rise": 2,
                   "healthtimeout": 0.5, **fe})
    _, port = expose(prod.lab, "fe", "127.0.0.1", STATUS_PORT)
    return f"http://127.0.0.1:{port}/"


def texts(driver, selector: str) -> list[str]:
    """The text of every element matching `selector`, read in one go inside the page (the page rebuilds
    its tables once a second: element handles kept across calls go stale)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)", selector)


def cell(driver, name: str, cls: str) -> str:
    found = texts(driver, f'#backends tr[data-backend="{name}"] td.{cls}')
    assert len(found) == 1, f"no {cls} cell for {name}"
    return found[0]


def state(driver, name: str) -> str:
    return cell(driver, name, "state").lower()


def click(driver, name: str) -> str:
    """Click back end `name`'s write button; returns its label. Retried when the row was just rebuilt."""
    def once() -> str:
        button = driver.find_element(By.CSS_SELECTOR, f'#backends tr[data-backend="{name}"] button')
        label = button.text
        button.click()
        return label
    return wait_until(once, 30, f"a click on {name}'s button")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#backends tr[data-backend]"), 30,
               "the page's first poll")


def test_page_shows_health_live_and_request_data_as_text(prod, browser):
    url = start(prod)
    be1, be2 = f"{prod.lab.ip('be1')}:666", f"{prod.lab.ip('be2')}:666"
    open_page(browser, url)
    assert wait_until(lambda: state(browser, be1) == "up" and state(browser, be2) == "up", 30)
    assert browser.find_element(By.ID, "vip").text.startswith(prod.lab.vip)
    assert texts(browser, "#rules td.rule") == ["uri:jpg$", "uri:.*"]
    assert console_errors(browser) == []

    # A Host header carrying a script: the front end answers 400 and the page shows the head as text.
    payload = "<script>window.tcphaInjected=1</script>"
    with prod.lab.connect("client", prod.lab.vip, 80) as s:
        s.sendall(f"GET /x HTTP/1.1\r\nHost: {payload}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert wait_until(lambda: any(payload in h for h in texts(browser, "#answers td.head")), 30,
                      "the 400 on the page")
    assert browser.execute_script("return window.tcphaInjected === undefined")
    assert browser.execute_script("return document.scripts.length") == 1     # status.js only
    assert console_errors(browser) == []

    # be2's application stops: down on the page within 2 s of the check that took it out.
    prod.dep.origins.pop("be2").stop()
    assert wait_until(lambda: state(browser, be2) == "down", 30, "be2 down on the page")
    seen = time.time()
    doc = prod.ctl_json("status")
    failed_at = [b for b in doc["backends"] if b["name"] == be2][0]["since"]
    assert seen - failed_at <= 2.0, f"shown {seen - failed_at:.2f} s after the failed check"
    assert "8080" in cell(browser, be2, "error")
    assert state(browser, be1) == "up"
    # and up again once it recovers (rise = 2 good checks)
    prod.dep.origins["be2"] = start_http(prod.lab, "be2", port=8080, files=prod.dep.files, name="again")
    assert wait_until(lambda: state(browser, be2) == "up", 30, "be2 up again on the page")
    assert wait_until(lambda: cell(browser, be2, "error") == "", 10)


def test_handoffs_grow_under_wrk(prod, browser):
    url = start(prod)
    open_page(browser, url)
    be1, be2 = f"{prod.lab.ip('be1')}:666", f"{prod.lab.ip('be2')}:666"
    total = lambda: int(texts(browser, "#handoffs")[0])  # noqa: E731
    before = total()
    # a connection per request: each one is a handoff (wrk keeps connections open otherwise)
    wrks = [prod.lab.popen("client", ["wrk", "-t1", "-c4", "-d60s", "-H", "Connection: close", f"http://{prod.lab.vip}{path}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for path in ("/index.html", "/img/logo.jpg")]
    try:
        first = wait_until(lambda: (lambda n: n if n > before + 100 else None)(total()), 60, "handoffs counted")
        assert wait_until(lambda: total() > first + 100, 60, "handoffs still growing")
        rate = lambda name: float(cell(browser, name, "rate"))  # noqa: E731
        assert wait_until(lambda: rate(be1) > 0 and rate(be2) > 0, 30, "per back end rates")
        assert wait_until(lambda: float(texts(browser, "#rate")[0]) > 0, 30)
        # the chart has points: its series is the document's history
        assert wait_until(lambda: browser.execute_script(
            "return lastDoc.history.filter(p => p[1] > 0).length") >= 3, 30, "three samples under load")
        shot = os.environ.get("TCPHA_STATUS_SCREENSHOT")
        if shot:                                          # a chart with half a minute in it
            wait_until(lambda: browser.execute_script("return lastDoc.history.filter(p => p[1] > 0).length") >= 30,
                       60, "30 samples under load")
            browser.save_screenshot(shot)
        assert console_errors(browser) == []
    finally:
        for w in wrks:
            prod.lab.stop(w)
    accepted = sum(int(t) for t in texts(browser, "#workers tbody td:nth-child(2)"))
    assert accepted >= first


def test_drain_button_needs_the_token(prod, browser):
    url = start(prod, statsadmin="on")
    be2 = f"{prod.lab.ip('be2')}:666"
    open_page(browser, url)
    message = lambda: texts(browser, "#adminmsg")[0]  # noqa: E731
    drained = lambda: [b for b in prod.ctl_json("status")["backends"] if b["name"] == be2][0]["drain"]  # noqa: E731

    assert click(browser, be2) == "drain"                         # no token
    assert wait_until(lambda: "refused (401)" in message(), 30), message()
    browser.find_element(By.ID, "token").send_keys("0" * 64)      # a wrong token
    click(browser, be2)
    assert wait_until(lambda: "refused (403)" in message(), 30), message()
    assert drained() is False
    assert state(browser, be2) == "up"

    token = subprocess.run(["python3", "-m", "tcpha.cli.keygen", "--statsadmin-token", str(prod.dep.key)],
                           capture_output=True, text=True, check=True).stdout.strip()
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    assert click(browser, be2) == "drain"
    assert wait_until(lambda: "drain" in message() and "done" in message(), 30), message()
    assert drained() is True
    assert wait_until(lambda: state(browser, be2) == "draining", 30)
    assert prod.dep.request("/index.html").status == 503          # be2 (its only back end) takes no new ones
    assert prod.dep.request("/img/logo.jpg").backend == "be1"
    wait_until(lambda: texts(browser, f'#backends tr[data-backend="{be2}"] button') == ["enable"], 30)
    assert click(browser, be2) == "enable"
    assert wait_until(lambda: "enable" in message() and "done" in message(), 30), message()
    assert drained() is False
    assert wait_until(lambda: prod.dep.request("/index.html").backend == "be2", 10)
    log = prod.fe_log()
    assert "write refused" in log and "no credential" in log and "bad signature" in log
    assert f"drain from 127.0.0.1:" in log and f"enable from 127.0.0.1:" in log and f"back end {be2}" in log


def page_request(prod: Prod, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request to the status page's port from inside the front end's namespace: (status, JSON)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", STATUS_PORT, timeout=20)
    conn.sock = prod.lab.connect("fe", "127.0.0.1", STATUS_PORT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_write_mode_is_off_by_default_and_a_reload_turns_it_on(prod):
    from tcpha.fe.status import admin_token, sign
    from tcpha.config import read_authkey
    start(prod)
    body = json.dumps({"backend": f"{prod.lab.ip('be2')}:666", "action": "drain"}).encode()
    assert page_request(prod, "POST", "/admin", body)[0] == 403
    assert page_request(prod, "GET", "/admin/nonce")[0] == 403
    assert [b for b in prod.ctl_json("status")["backends"] if b["drain"]] == []
    assert "write mode is off" in prod.fe_log()
    assert prod.ctl_json("status")["statsadmin"] is False

    prod.dep.write_fe_config(rundir=prod.fe_rundir, dbglevel=3, metrics=f"127.0.0.1:{STATUS_PORT}", dtcinterval=1,
                             statsadmin="on")
    os.kill(prod.dep.fe_proc.pid, signal.SIGHUP)
    assert wait_until(lambda: prod.ctl_json("status")["statsadmin"] is True, 30, "statsadmin on after SIGHUP")
    status, answer = page_request(prod, "GET", "/admin/nonce")
    assert status == 200
    nonce = answer["nonce"]
    token = admin_token(read_authkey(str(prod.dep.key)))
    auth = {"X-Tcpha-Auth": f"{nonce} {sign(token, nonce, 'POST', '/admin', body)}"}
    assert page_request(prod, "POST", "/admin", body, auth) == (200, {"ok": True})
    assert [b["name"] for b in prod.ctl_json("status")["backends"] if b["drain"]] == [f"{prod.lab.ip('be2')}:666"]
    assert page_request(prod, "POST", "/admin", body, auth)[0] == 403          # the nonce was used
