"""The labeling page as labelers and the admin see it: headless Chromium (selenium) against `alignflow label serve`.

Two labelers open their personal links, rank by keyboard and by dragging, choose on the A/B scale; a response with
<script> shows as text; the admin exports and sees the report. Screenshots go to ALIGNFLOW_SCREENSHOTS (default:
the test's tmp dir). Needs Debian's `chromium` and `chromium-driver` and `selenium`; skipped with the reason when
absent. Also: a server killed mid-batch loses no accepted submission.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import BIN, clean_env, free_port, headless_chromium, spawn, stop, wait_http  # noqa: E402

from alignflow.tasks.label.store import LabelStore  # noqa: E402

pytestmark = pytest.mark.slow

XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


def _items() -> list[dict]:
    code = "Use it like this:\n```python\nprint('<b>not bold</b>')\n```\nDone."
    return [
        {"item_id": "i0", "prompt_id": "p0", "prompt": "How do I print in Python?",
         "responses": [{"id": "r0", "text": code, "policy": "ppo"}, {"id": "r1", "text": XSS, "policy": "sft"},
                       {"id": "r2", "text": "No idea.", "policy": "sft"}]},
        {"item_id": "i1", "prompt_id": "p1", "prompt": "Sort a list?",
         "responses": [{"id": "r0", "text": "sorted(xs)", "policy": "ppo"},
                       {"id": "r1", "text": "xs.sort() sorts in place", "policy": "sft"},
                       {"id": "r2", "text": "Use a loop.", "policy": "sft"}]},
        {"item_id": "i2", "prompt_id": "p2", "prompt": "Read a file?",
         "responses": [{"id": "r0", "text": "open(path).read()", "policy": "ppo"},
                       {"id": "r1", "text": "Files are hard.", "policy": "sft"}]},
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("label-ui")
    store = LabelStore(f"sqlite:///{work / 'label.db'}")
    store.create_batch("b1", "first batch", _items(), overlap=2,
                       instructions="Rank best first. <i>Tags</i> here are text.")
    tokens = {name: store.invite(name, admin=name == "admin") for name in ("admin", "ann", "bob")}
    store.close()
    port = free_port()
    log = work / "serve.log"
    proc = spawn([str(BIN / "alignflow"), "label", "serve", "--workdir", str(work), "--port", str(port)],
                 clean_env(), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "tokens": tokens, "work": work}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1300,1000")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ALIGNFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, cond, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: cond(d))


def _login(driver, server, who: str) -> None:
    driver.get("about:blank")
    driver.get(f"{server['url']}/?batch=b1#token={server['tokens'][who]}")
    _wait(driver, lambda d: who in d.find_element("id", "who").text)
    assert "token=" not in driver.current_url  # the token leaves the address bar


def _cards(driver):
    return driver.find_elements("css selector", "#ranking .card")


def _order(driver) -> list[str]:
    return [c.get_attribute("data-id") for c in _cards(driver)]


def _submit_and_wait(driver, progress_before: str) -> None:
    driver.find_element("id", "submit").click()
    _wait(driver, lambda d: d.find_element("id", "progress").text != progress_before
          or not d.find_element("id", "done").get_attribute("hidden"))


def _label_item(driver, prompt: str):
    """Wait until the item with ``prompt`` is shown."""
    _wait(driver, lambda d: d.find_element("id", "prompt").text.strip() == prompt)


def test_two_labelers_rank_by_keyboard_drag_and_ab_then_admin_exports(browser, server, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    prompts = {it["prompt"]: it for it in _items()}
    done_by: dict[str, list] = {"ann": [], "bob": []}
    for who in ("ann", "bob"):
        _login(browser, server, who)
        for step in range(3):
            _wait(browser, lambda d: d.find_element("id", "prompt").text.strip() in prompts)
            prompt = browser.find_element("id", "prompt").text.strip()
            progress = browser.find_element("id", "progress").text
            assert progress == f"{step + 1} of 3"
            assert browser.find_element("id", "instructions").text == "Rank best first. <i>Tags</i> here are text."
            if len(prompts[prompt]["responses"]) == 2:
                browser.find_element("tag name", "body").send_keys("2")  # "A better"
                assert browser.find_element("id", "ab-2").is_selected()
                browser.save_screenshot(str(shots / f"label-ab-{who}.png"))
                shown = None
            elif who == "ann":
                # keyboard: focus the top card, Alt+Down moves it to second place, T ties the third with it
                first = _cards(browser)[0]
                first.find_element("css selector", ".body").click()
                before = _order(browser)
                ActionChains(browser).key_down(Keys.ALT).send_keys(Keys.ARROW_DOWN).key_up(Keys.ALT).perform()
                _wait(browser, lambda d: _order(d) == [before[1], before[0], before[2]])
                ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()  # focus moves to the third card
                ActionChains(browser).send_keys("t").perform()
                _wait(browser, lambda d: "tied" in _cards(d)[2].get_attribute("class"))
                shown = [[before[1]], [before[0], before[2]]]
                browser.save_screenshot(str(shots / f"label-keyboard-{step}.png"))
            else:
                # drag the bottom card to the top by its handle
                before = _order(browser)
                handle = _cards(browser)[2].find_element("css selector", ".handle")
                ActionChains(browser).click_and_hold(handle).pause(0.2).move_to_element(_cards(browser)[0]) \
                    .pause(0.2).release().perform()
                _wait(browser, lambda d: _order(d)[0] == before[2])
                shown = [[x] for x in _order(browser)]
                browser.save_screenshot(str(shots / f"label-drag-{step}.png"))
            if "window.__xss" in "".join(r["text"] for r in prompts[prompt]["responses"]):
                assert browser.execute_script("return window.__xss") is None
                page_text = browser.find_element("id", "labeling").text
                assert "<script>window.__xss = 1</script>" in page_text
                assert browser.find_elements("css selector", "#ranking pre code")  # the code block as <pre>
                assert not browser.find_elements("css selector", "#ranking b, #ranking img, #ranking script")
                browser.save_screenshot(str(shots / "label-escaped-html.png"))
            done_by[who].append((prompt, shown))
            _submit_and_wait(browser, progress)
        _wait(browser, lambda d: d.find_element("id", "done").is_displayed())
        browser.save_screenshot(str(shots / f"label-done-{who}.png"))

    _login(browser, server, "admin")
    _wait(browser, lambda d: d.find_elements("css selector", "button.export"))
    browser.find_element("css selector", "button.export").click()
    _wait(browser, lambda d: d.find_elements("id", "export-link"))
    assert "Exported 6 submissions" in browser.find_element("id", "message").text
    browser.find_element("xpath", "//button[text()='report']").click()
    _wait(browser, lambda d: "Policy leaderboard" in d.find_element("id", "report-body").text, timeout=60)
    browser.save_screenshot(str(shots / "label-admin-report.png"))
    assert "Krippendorff" in browser.find_element("id", "report-body").text

    store = LabelStore(f"sqlite:///{server['work'] / 'label.db'}")
    rows = store.export("b1")
    store.close()
    assert len(rows) == 6
    for who, labeled in done_by.items():
        mine = {r["prompt"]: r for r in rows if r["labeler"] == who}
        for prompt, groups in labeled:
            if groups is not None:
                assert mine[prompt]["groups"] == groups, (who, prompt)
            else:  # A/B: "A better" puts the first shown response above the second, strength 2
                assert mine[prompt]["groups"] == [[mine[prompt]["shown_order"][0]], [mine[prompt]["shown_order"][1]]]
                assert mine[prompt]["strength"] == 2


def test_wrong_token_sees_the_sign_in_box_only(browser, server):
    browser.get("about:blank")
    browser.get(f"{server['url']}/#token=not-a-token")
    _wait(browser, lambda d: d.find_element("id", "login").is_displayed())
    assert "missing or unknown token" in browser.find_element("id", "message").text
    assert not browser.find_element("id", "labeling").is_displayed()


def test_killing_the_server_mid_batch_loses_no_accepted_submission(tmp_path):
    from alignflow.tasks.label.simulate import LabelerModel, run_labelers

    items = [{"item_id": f"i{i}", "prompt_id": f"p{i}", "prompt": f"q{i}",
              "responses": [{"id": f"r{j}", "text": f"a{j}", "policy": f"p{j}"} for j in range(3)]} for i in range(400)]
    store = LabelStore(f"sqlite:///{tmp_path / 'label.db'}")
    store.create_batch("b", "b", items, overlap=1)
    tokens = [store.invite(f"l{i}") for i in range(4)]
    store.close()
    port = free_port()
    log = tmp_path / "serve.log"
    proc = spawn([str(BIN / "alignflow"), "label", "serve", "--workdir", str(tmp_path), "--port", str(port)],
                 clean_env(), log)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc, log)
    result = {}

    def label():
        result["stats"] = run_labelers(f"http://127.0.0.1:{port}", tokens, "b",
                                       model=LabelerModel(strength=lambda p, t: 0.0), retries=0)

    t = threading.Thread(target=label)
    t.start()
    deadline = time.monotonic() + 60
    store = LabelStore(f"sqlite:///{tmp_path / 'label.db'}")
    while store.counts("b")["submissions"] < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no shutdown of any kind
    t.join(60)
    stop(proc)
    accepted = result["stats"].accepted
    stored = {r["submission_id"] for r in store.export("b")}
    assert 20 <= len(stored) < 400  # the kill came mid-batch
    assert set(accepted) <= stored  # every answer the server confirmed survived the kill
    # The server may commit a submission and die before its reply reaches the labeler: each of the
    # labelers has at most one request in flight, so at most that many stored rows lack a confirmation.
    assert len(stored - set(accepted)) <= len(tokens)
    assert len(accepted) >= 20 - len(tokens)
    store.close()
