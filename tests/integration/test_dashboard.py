"""The dashboard in a real headless Chromium (Debian's chromium, driven by
Selenium through Debian's chromedriver) against three real nodes: three
members and one leader; the leader's process killed and the new leader shown
without a reload; an agent joining and appearing in the agents table; the
bus, sagas and chaos panels; and, with auth on, the admin-token login and
an agent's login (requests signed in the browser), which shows only what the
agent's roles reach.
Screenshots go to artifacts/ui/ (ignored by git)."""

from __future__ import annotations

import functools
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import debian
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = debian.install(["chromium", "chromium-driver"], CHROMIUM, CHROMEDRIVER)  # never a browser download
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Every wait here reads the page through Selenium: every 0.1 s, within DEADLINE_S.
until = functools.partial(wait_until, timeout_s=DEADLINE_S, interval_s=0.1)


def _rows(driver: Any, table: str, attribute: str) -> dict[str, str]:
    """The rows of a table: the row's ``data-<attribute>`` -> its text, read in one
    script (the page re-renders its tables; elements found earlier go stale)."""
    return driver.execute_script(
        "const out = {}; for (const row of document.querySelectorAll(`#${arguments[0]} tbody tr`)) "
        "out[row.dataset[arguments[1]]] = row.innerText; return out;", table, attribute)


def _roles(driver: Any) -> dict[str, str]:
    return driver.execute_script(
        "const out = {}; for (const row of document.querySelectorAll('#members tbody tr')) "
        "out[row.dataset.member] = row.dataset.role; return out;")


def _post(base: str, path: str, body: dict[str, Any], *, method: str = "POST", token: str | None = None
          ) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _chaos_run(run: Path) -> None:
    """A finished run as ``python -m chaos.run`` leaves it, with a real plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run.mkdir(parents=True)
    (run / "verdict.json").write_text(json.dumps({"register": {"valid": True}, "locks": {"valid": True}}))
    (run / "report.txt").write_text("register: 3 ops, linearizable\nlocks: fencing holds\n")
    figure, axes = plt.subplots(figsize=(6, 2))
    axes.plot([0, 1, 2], [1.0, 3.0, 2.0])
    axes.set_xlabel("s")
    figure.savefig(run / "latency.png")
    plt.close(figure)


def _click(driver: Any, selector: str) -> None:
    """Find and click in one script: the page re-renders its tables on events,
    so an element found by one call may be gone by the next."""
    until(lambda: driver.execute_script(
        "const el = document.querySelector(arguments[0]); if (!el) return false; el.focus(); el.click(); "
        "return true;", selector),
          f"{selector} to click")


CONTRAST_SCRIPT = """
function rgb(text) { return text.match(/[\\d.]+/g).map(Number); }
function luminance([r, g, b]) {
  const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
}
function background(el) {
  for (; el; el = el.parentElement) {
    const c = rgb(getComputedStyle(el).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
}
const low = [];
for (const el of document.querySelectorAll("body *")) {
  const text = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim()).join("");
  if (!text || !el.getClientRects().length) continue;
  const style = getComputedStyle(el);
  const [a, b] = [luminance(rgb(style.color)), luminance(background(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
  const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  if (ratio < needed) low.push(`${el.tagName}.${el.className} "${text.slice(0, 30)}" ${ratio.toFixed(2)}`);
}
return low;
"""


def _low_contrast(driver: Any) -> list[str]:
    """Visible text below WCAG AA contrast (4.5:1, large text 3:1) against its background."""
    return driver.execute_script(CONTRAST_SCRIPT)


def _shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_the_dashboard_shows_the_cluster_live(make_cluster, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    cluster = make_cluster()
    old = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != old)
    browser.set_window_size(1280, 800)
    _chaos_run(cluster.dir / follower / "chaos" / "20261127-101010")  # the node's default chaos directory
    browser.get(cluster.url(follower) + "/ui")
    roles = until(lambda: (r := _roles(browser)) and len(r) == 3 and list(r.values()).count("leader") == 1 and r,
                  "three members and one leader")
    assert roles[old] == "leader" and set(roles) == set(cluster.members)
    assert browser.find_element(By.ID, "node").text == follower
    until(lambda: browser.find_element(By.ID, "live").text == "live", "the live stream")
    until(lambda: "elected" in browser.find_element(By.ID, "leader-changes").text,
          "the leader election in the timeline")
    _shot(browser, "cluster")

    cluster.kill(old)  # no reload from here on
    roles = until(lambda: (r := _roles(browser)) and list(r.values()).count("leader") == 1
                  and r[old] == "unreachable" and r,
                  "a new leader, the old one unreachable")
    new = next(member for member, role in roles.items() if role == "leader")
    assert new != old and cluster.status(new)["role"] == "leader"
    until(lambda: browser.find_element(By.ID, "leader-changes").text.count("elected") >= 2,
          "the new election in the timeline")
    _shot(browser, "cluster-after-kill")

    assert _post(cluster.url(follower), "/v1/agents", {"id": "dash-agent-1", "type": "planner", "ttl_s": 60})["id"]
    agents = until(lambda: (a := _rows(browser, "agent-table", "agent")) and "dash-agent-1" in a and a,
                   "the agent in the table")
    assert "planner" in agents["dash-agent-1"] and "closed" in agents["dash-agent-1"]  # its breaker, this node
    browser.find_element(By.TAG_NAME, "body").send_keys("/")  # the shortcut to the filter
    search = browser.switch_to.active_element
    assert search.get_attribute("id") == "agent-filter"
    search.send_keys("no-such-agent")
    until(lambda: "dash-agent-1" not in _rows(browser, "agent-table", "agent"), "the filter to hide it")
    search.clear()
    search.send_keys("planner")
    until(lambda: "dash-agent-1" in _rows(browser, "agent-table", "agent"), "the filter to show it")
    search.clear()

    # an agent that refuses connections, called through another node: its breaker opens there, shown here
    third = next(n for n in cluster.members if n not in (old, follower))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    _post(cluster.url(third), "/v1/agents", {"id": "dash-agent-2", "type": "refuser", "ttl_s": 60,
                                             "endpoint": f"http://127.0.0.1:{closed}"})
    _post(cluster.url(third), "/v1/services/refuser", {"breaker": {"consecutive_failures": 1, "open_s": 600},
                                                       "retry": {"max_attempts": 1}}, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(cluster.url(third), "/v1/services/refuser/invoke", {})
    refused.value.close()
    assert refused.value.code == 502
    agents = until(lambda: (a := _rows(browser, "agent-table", "agent"))
                   and f"open on {third}" in a.get("dash-agent-2", "") and a,
                   "the breaker open on the calling node")
    assert "closed" in agents["dash-agent-1"]
    assert re.search(r"\b\d{1,2} s\b", agents["dash-agent-1"]), agents  # its lease (of 60 s), as the leader counts it
    _shot(browser, "agents")

    # the bus: a subscription with a backlog, a topic with its count (refreshed with the counters)
    _post(cluster.url(follower), "/v1/subscriptions", {"topic": "orders.created"})
    for n in range(3):
        _post(cluster.url(follower), "/v1/topics/orders.created/messages", {"payload": {"n": n}})
    until(lambda: "3" in _rows(browser, "topic-table", "topic").get("orders.created", ""), "the topic's count")
    consumers = until(lambda: (c := _rows(browser, "subscription-table", "consumer"))
                      and any("orders.created\t3" in text for text in c.values()) and c,
                      "the subscription's backlog")
    assert len(consumers) == 1
    browser.execute_script("document.getElementById('bus').scrollIntoView()")
    _shot(browser, "bus")

    # a saga whose only step has no agent to run it: it fails and compensates, live in the sagas panel
    saga = _post(cluster.url(follower), "/v1/sagas", {"name": "checkout", "steps": [
        {"id": "charge", "action": {"kind": "agent", "agent_type": "nobody"},
         "retry": {"max_attempts": 1, "backoff_s": 0, "backoff_max_s": 0}, "timeout_s": 1}]})
    until(lambda: "compensated" in _rows(browser, "saga-table", "saga").get(saga["id"], ""), "the saga's end")
    pressed = [0.0]

    def open_from_the_keyboard() -> bool:
        focused = browser.execute_script(
            "const b = document.querySelector(arguments[0]); if (b) b.focus();"
            " return b && document.activeElement === b;", f"#saga-table tr[data-saga='{saga['id']}'] button")
        if focused:
            browser.switch_to.active_element.send_keys(Keys.ENTER)
            pressed[0] = time.monotonic()
        return bool(focused)

    def history_shown() -> str | None:
        text = browser.find_element(By.ID, "saga-history").text
        if "saga.step.failed charge" in text:
            return text
        # The table re-renders on events and timers: an Enter may land on a row just replaced
        # (or its fetch meet a busy node's 503); press it again now and then, from the keyboard.
        if time.monotonic() - pressed[0] > 3.0:
            open_from_the_keyboard()
        return None

    until(open_from_the_keyboard, "the saga's button focused")
    history = until(history_shown, "the saga's history")
    assert "saga.started" in history and "saga.compensated" in history
    browser.execute_script("document.getElementById('sagas').scrollIntoView()")
    _shot(browser, "sagas")

    # the chaos panel: the run found in the node's chaos directory, its report and plot
    _click(browser, "#chaos-table tr[data-run='20261127-101010'] button")
    until(lambda: "3 ops, linearizable" in browser.find_element(By.ID, "chaos-report").text, "the run's report")
    until(lambda: browser.execute_script(
        "const img = document.getElementById('chaos-plot'); return !img.hidden && img.naturalWidth > 0;"),
          "the run's plot")
    assert "passed" in _rows(browser, "chaos-table", "run")["20261127-101010"]
    browser.execute_script("document.getElementById('chaos').scrollIntoView()")
    _shot(browser, "chaos")

    assert _low_contrast(browser) == []
    browser.set_window_size(420, 800)  # a narrow window: the tables scroll, the page does not break
    _shot(browser, "narrow")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 440


def test_with_auth_on_the_dashboard_asks_for_the_token(make_cluster, browser) -> None:
    from selenium.webdriver.common.by import By

    cluster = make_cluster(secure=True)
    cluster.wait_leader()
    browser.set_window_size(1280, 800)
    browser.get(cluster.url(cluster.members[0]) + "/ui")
    until(lambda: browser.execute_script("return !document.getElementById('login').hidden"), "the login form")
    assert _roles(browser) == {}  # nothing shown without a credential
    token = browser.find_element(By.ID, "token")
    token.send_keys("not-the-token")
    _click(browser, "#login-form button")
    until(lambda: "admin token is not valid" in browser.find_element(By.ID, "login-error").text, "the refusal")
    token.clear()
    token.send_keys(cluster.admin_token)
    _click(browser, "#login-form button")
    until(lambda: len(_roles(browser)) == 3, "three members after signing in")
    until(lambda: browser.find_element(By.ID, "live").text == "live", "the live stream with the token")
    assert browser.execute_script("return document.getElementById('login').hidden")
    _shot(browser, "signed-in")


def test_an_agent_signs_in_and_sees_only_what_its_roles_reach(make_cluster, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    from coordinator.crypto import AgentKeys

    cluster = make_cluster(secure=True)
    node = cluster.members[0]
    base, token = cluster.url(node), cluster.admin_token
    cluster.wait_leader()
    keys = AgentKeys.generate()
    keys.save(tmp_path / "alice.key")
    _post(base, "/v1/roles/orders-reader", {"permissions": [
        {"action": "receive", "pattern": "orders.*"}, {"action": "saga", "pattern": "checkout"}]},
        method="PUT", token=token)
    _post(base, "/v1/agents", {"id": "alice", "type": "clerk", "public_key": keys.public_key, "ttl_s": 600},
          token=token)
    _post(base, "/v1/agents/alice/roles", {"roles": ["orders-reader"]}, method="PUT", token=token)
    for topic in ("orders.eu", "hr.payroll"):
        _post(base, "/v1/subscriptions", {"topic": topic}, token=token)
        _post(base, f"/v1/topics/{topic}/messages", {"payload": {"n": 1}}, token=token)
    _chaos_run(cluster.dir / node / "chaos" / "20261127-101010")

    browser.set_window_size(1280, 800)
    browser.get(base + "/ui")
    browser.execute_script("sessionStorage.clear()")  # nothing kept from the admin's test
    browser.refresh()
    until(lambda: browser.execute_script("return !document.getElementById('login').hidden"), "the login form")
    _click(browser, "#kind-agent")
    browser.find_element(By.ID, "agent-id").send_keys("alice")
    key_field = browser.find_element(By.ID, "agent-key")
    AgentKeys.generate().save(tmp_path / "other.key")
    key_field.send_keys((tmp_path / "other.key").read_text())  # another agent's key: the signature fails
    _click(browser, "#login-form button")
    until(lambda: "does not verify" in browser.find_element(By.ID, "login-error").text, "the refusal")
    _shot(browser, "agent-login-refused")
    assert _low_contrast(browser) == []
    key_field.clear()
    key_field.send_keys((tmp_path / "alice.key").read_text())  # the file AgentKeys.save wrote
    _click(browser, "#login-form button")
    until(lambda: len(_roles(browser)) == 3, "three members after signing in")
    until(lambda: browser.find_element(By.ID, "live").text == "live", "the live stream, signed")
    assert "agent alice" in browser.find_element(By.ID, "who").text
    # the key is held by the page only: the tab's storage has the id, no key
    assert json.loads(browser.execute_script("return sessionStorage.getItem('coord-session')")) == {
        "kind": "agent", "id": "alice"}
    browser.refresh()
    until(lambda: browser.execute_script(
        "return !document.getElementById('login').hidden && document.getElementById('agent-id').value === 'alice'"
        " && document.getElementById('kind-agent').checked && document.getElementById('agent-key').value === ''"),
          "the login form after a reload, the id remembered")
    assert "key again" in browser.find_element(By.ID, "login-note").text
    browser.find_element(By.ID, "agent-key").send_keys((tmp_path / "alice.key").read_text())
    _click(browser, "#login-form button")
    until(lambda: len(_roles(browser)) == 3 and browser.find_element(By.ID, "live").text == "live",
          "signed in again")

    # only the topic and subscription its role reaches; the chaos panel says it needs the admin
    until(lambda: "orders.eu" in _rows(browser, "topic-table", "topic"), "the orders topic")
    assert list(_rows(browser, "topic-table", "topic")) == ["orders.eu"]
    consumers = _rows(browser, "subscription-table", "consumer")
    assert len(consumers) == 1 and "orders.eu" in next(iter(consumers.values()))
    assert "alice" in _rows(browser, "agent-table", "agent")  # the registry is everyone's
    note = until(lambda: browser.execute_script(
        "const n = document.querySelector('#chaos .hidden-note'); return n && n.textContent;"),
                 "the chaos panel's note")
    assert note == "Not shown to agent alice: this needs the admin."
    assert browser.execute_script("return document.querySelector('#chaos .body').hidden")
    assert _low_contrast(browser) == []

    # sagas started now: the checkout one appears live, the refund one never does
    steps = [{"id": "s1", "action": {"kind": "topic", "topic": "orders.eu"}}]
    refund = _post(base, "/v1/sagas", {"name": "refund", "steps": steps}, token=token)
    checkout = _post(base, "/v1/sagas", {"name": "checkout", "steps": steps}, token=token)
    until(lambda: checkout["id"] in _rows(browser, "saga-table", "saga"), "the checkout saga")
    assert refund["id"] not in _rows(browser, "saga-table", "saga")
    counts = browser.find_element(By.ID, "saga-counts").text
    assert sum(int(part.rsplit(": ", 1)[1]) for part in counts.split(" · ")) == 1, counts
    _shot(browser, "agent-signed-in")
    browser.execute_script("document.getElementById('bus').scrollIntoView()")
    _shot(browser, "agent-bus-sagas-chaos")

    _click(browser, "#sign-out")
    until(lambda: browser.execute_script(
        "return !document.getElementById('login').hidden && sessionStorage.getItem('coord-session') === null"),
          "the login form again")
