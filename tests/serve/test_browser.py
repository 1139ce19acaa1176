"""``wadi serve`` in a real browser: headless Chromium types a prompt and gets a PNG back.

Marked ``browser`` (not in ``make test``); ``.ci/run`` installs Chromium and Selenium and
runs ``pytest -m browser tests/serve``.  Skipped, with the reason, when Selenium, Chromium
or chromedriver is not installed; once they are, a page that does not work fails.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

PROMPT = "a handwritten digit seven"
START_TIMEOUT_S = 240  # imports and model loading on a busy 2-core machine
WAIT_S = 120


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser_tools():
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("Selenium is not installed: pip install selenium (see .ci/run)")
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver = _find("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "Chromium or chromedriver is not installed: apt-get install chromium chromium-driver"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def server_url(browser_tools):
    """`wadi serve` (the shipped digits student, its teacher) on a free port, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "wadi.cli", "serve", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def read():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline, url = time.monotonic() + START_TIMEOUT_S, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(r"open (http://\S+/)", line)
        url = match.group(1) if match else None
    try:
        assert url, "wadi serve did not start:\n" + "".join(seen)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def driver(browser_tools):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_tools
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,800",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def _png_of(img) -> bytes:
    src = img.get_attribute("src") or ""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return base64.b64decode(src[len(prefix) :])


def test_typing_a_prompt_shows_the_students_png_and_the_teacher_beside_it(
    driver, server_url, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server_url)
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "models").text.startswith("student:"))
    seed = driver.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("3")
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(PROMPT)  # one key at a time: the debounced "generate as you type"

    student = driver.find_element(By.ID, "student-img")
    wait.until(lambda d: student.get_attribute("data-prompt") == PROMPT)
    png = _png_of(student)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert student.get_attribute("data-seed") == "3"
    assert re.fullmatch(r"\d+\.\d ms", driver.find_element(By.ID, "student-ms").text)

    driver.find_element(By.ID, "compare").click()
    teacher = driver.find_element(By.ID, "teacher-img")
    wait.until(lambda d: teacher.get_attribute("data-prompt") == PROMPT)
    assert teacher.is_displayed()
    assert _png_of(teacher) != png, "the teacher's 25-step image is the student's"
    assert re.fullmatch(r"\d+\.\d ms", driver.find_element(By.ID, "teacher-ms").text)
    assert driver.find_element(By.ID, "error").text == ""

    shot = Path(tmp_path) / "wadi-serve.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")
    print(f"screenshot: {shot}")
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"
