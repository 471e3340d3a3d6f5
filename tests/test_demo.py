"""The Gradio demo in a real browser (headless Chromium through selenium): chat gets a streamed
answer, a small batch draws its timelines, bad input shows a message and the app keeps serving.

The app runs as ``python -m tdpipe_hf.apps.cli demo`` on a tiny random model (fast), bound to
127.0.0.1 on a free port, and is stopped at the end. Screenshots go to ``tests/output/demo/``
(git-ignored) so they can be looked at after a run. Chromium and chromedriver come from Debian
(``.ci/run`` installs them); without them the test skips locally and fails under CI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_model_dir

SCREENSHOTS = Path(__file__).parent / "output" / "demo"
START_TIMEOUT = 240  # seconds for the app to answer HTTP (gradio's import alone is slow on 2 cores)
UI_TIMEOUT = 120  # seconds for anything to appear in the page


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the browser test; see .ci/run)")
    pytest.skip(what)


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        _missing("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with code {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the demo did not answer {url} within {START_TIMEOUT}s:\n{log.read_text()[-4000:]}")


def test_backend_refuses_bad_input_and_serves_users_together(tmp_path):
    """Without a browser: every bad input is a DemoError with a clear message, and two users
    chatting at once both get the answer each would get alone (greedy)."""
    import threading

    from tdpipe_hf.apps.demo import DemoBackend, DemoError

    backend = DemoBackend(str(tiny_model_dir(tmp_path / "model")), stages=2, max_new_tokens=12)
    try:
        def answer(text: str) -> str:
            *_, (history, status) = backend.chat(text, [], 12)
            assert status.startswith("answered: 12 tokens")
            return history[-1]["content"]

        alone = {text: answer(text) for text in ("first user", "second user")}
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda t=text: together.__setitem__(t, answer(t))) for text in alone]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert together == alone

        for message, tokens, needle in (("", 8, "empty"), ("hi", 0, "max new tokens"),
                                        ("hi", "lots", "max new tokens"), ("x" * 400, 8, "too long")):
            with pytest.raises(DemoError, match=needle):
                list(backend.chat(message, [], tokens))
        good = dict(n=4, max_new_tokens=8, stages=2, executor="local", policy_a="tdpipe", policy_b="naive",
                    kv_blocks=None)
        for change, needle in (({"n": 0}, "number of prompts"), ({"n": 100000}, "number of prompts"),
                               ({"n": 2.5}, "number of prompts"), ({"n": None}, "number of prompts"),
                               ({"stages": 5}, "stage count"), ({"policy_b": "fastest"}, "policy B"),
                               ({"executor": "gpu"}, "executor"), ({"kv_blocks": -3}, "KV blocks")):
            with pytest.raises(DemoError, match=needle):
                backend.check_batch(**{**good, **change})
        with pytest.raises(DemoError, match="KV cache"):
            backend.run_batch(backend.check_batch(**{**good, "kv_blocks": 1}))
        result = backend.run_batch(backend.check_batch(**good))
        assert all(Path(run["timeline_png"]).is_file() for run in result["runs"])
        assert Path(result["kv_png"]).is_file() and "| B | naive |" in result["table"]
    finally:
        backend.close()


@pytest.fixture
def demo_url(tmp_path):
    """The URL of a demo app running in its own process group, stopped (all of it) afterwards."""
    if importlib.util.find_spec("gradio") is None:
        _missing("gradio is not installed (pip install -e '.[test]')")
    model = tiny_model_dir(tmp_path / "model")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tdpipe_hf.apps.cli", "demo", "--model", str(model),
                                 "--port", str(port), "--stages", "2", "--max-new-tokens", "24"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, log)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig)  # the group we started: the app and anything it spawned
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def browser():
    browser_path, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2200", "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(UI_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _text_of(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed())


def _wait_text(driver, selector: str, needle: str, shot: Path) -> str:
    """Wait until an element matching ``selector`` shows ``needle``; screenshot and fail otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, UI_TIMEOUT, poll_frequency=0.5).until(lambda d: needle in _text_of(d, selector))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        pytest.fail(f"{selector} never showed {needle!r} (shows {_text_of(driver, selector)!r}); see {shot}")
    return _text_of(driver, selector)


def _type_number(driver, selector: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"{selector} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(value)


def test_demo_in_browser(browser, demo_url):  # browser first: a missing one skips before the app starts
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    failed = SCREENSHOTS / "failure.png"
    browser.get(demo_url)
    wait = WebDriverWait(browser, UI_TIMEOUT, poll_frequency=0.5)
    message = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
    browser.save_screenshot(str(SCREENSHOTS / "01-loaded.png"))

    # Bad input: an empty message is refused with a message, not a stack trace.
    browser.find_element(By.CSS_SELECTOR, "#chat-send").click()
    _wait_text(browser, "#chat-error", "message first", failed)
    browser.save_screenshot(str(SCREENSHOTS / "02-chat-empty-message.png"))

    # A real message streams an answer from the engine.
    message.send_keys("Hello, pipeline!")
    message.send_keys(Keys.ENTER)
    status = _wait_text(browser, "#chat-status", "answered:", failed)
    assert "tokens/s" in status
    chat = _text_of(browser, "#chatbot")
    assert "Hello, pipeline!" in chat
    assert not _text_of(browser, "#chat-error")  # the earlier error is gone
    browser.save_screenshot(str(SCREENSHOTS / "03-chat-answer.png"))

    # Throughput tab: an absurd batch size is refused ...
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Throughput')]").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#batch-run")))
    _type_number(browser, "#batch-n", "0")
    browser.find_element(By.CSS_SELECTOR, "#batch-run").click()
    _wait_text(browser, "#batch-error", "number of prompts must be a whole number", failed)
    browser.save_screenshot(str(SCREENSHOTS / "04-batch-bad-n.png"))

    # ... and the app keeps serving: a small batch under two policies draws both timelines.
    _type_number(browser, "#batch-n", "6")
    _type_number(browser, "#batch-tokens", "8")
    _type_number(browser, "#batch-kv", "20")  # a tight KV budget: the KV plot shows real use
    browser.find_element(By.CSS_SELECTOR, "#batch-run").click()
    first = _wait_text(browser, "#batch-table", "tokens/s", failed)  # run A is shown while B runs
    assert "tdpipe" in first
    table = _wait_text(browser, "#batch-table", "hybrid", failed)
    assert "tdpipe" in table
    for image in ("#timeline-a img", "#timeline-b img", "#kv-plot img"):
        wait.until(lambda d: any(e.get_attribute("naturalWidth") not in (None, "0")
                                 for e in d.find_elements(By.CSS_SELECTOR, image)))
    assert not _text_of(browser, "#batch-error")
    browser.execute_script("document.querySelector('#batch-table').scrollIntoView()")
    browser.save_screenshot(str(SCREENSHOTS / "05-batch-timelines.png"))
