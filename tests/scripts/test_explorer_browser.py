"""The Explorer in a real headless browser: ``streamlit run scripts/explorer.py`` on loopback, Debian's chromium
driven through its chromedriver (selenium), a screenshot that shows the rendered page.

Skips (with the reason) when chromium, chromedriver or selenium is missing; ``.ci/run`` installs the Debian
packages ``chromium`` and ``chromium-driver`` so that CI runs it. Set ``EXPLORER_SCREENSHOT=/path/shot.png`` to
keep a copy of the screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "scripts" / "explorer.py"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TITLE = "Anomaly Explorer"
SERVER_START_S = 120  # the first run imports MONAI and torch: tens of seconds on a loaded 2-core machine
RENDER_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"streamlit not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """``streamlit run scripts/explorer.py`` on a free loopback port; always terminated."""
    tmp_path = tmp_path_factory.mktemp("streamlit")
    port = _free_port()
    log = tmp_path / "streamlit.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        # uploads and conversions of this run stay in the test's folder
        "MEDDIFF_EXPLORER_DIR": str(tmp_path / "work"),
    }
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian chromium through the explicit chromedriver; selenium-manager never downloads anything."""
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            pytest.skip(
                f"{exe} not installed (Debian packages chromium, chromium-driver; .ci/run installs them)"
            )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    # belt and braces: with both paths given selenium does not call selenium-manager, and offline it could not
    saved = {k: os.environ.get(k) for k in ("SE_OFFLINE", "SE_AVOID_STATS")}
    os.environ.update(SE_OFFLINE="true", SE_AVOID_STATS="true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",  # the tests run as root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _screenshot(driver, path: Path, copy_to: str | None) -> Path:
    time.sleep(1.0)  # let the sidebar and the status boxes finish painting
    assert driver.save_screenshot(str(path)), "chromium did not write a screenshot"
    if copy_to:
        dest = Path(copy_to)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return path


def _assert_not_blank(png: Path) -> None:
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        assert im.size[0] >= 800 and im.size[1] >= 600
        grey = im.convert("L")
        lo, hi = grey.getextrema()
        # a blank page is one colour; the rendered app has dark text on light ground and a sidebar
        assert hi - lo > 100, (lo, hi)
        assert ImageStat.Stat(grey).stddev[0] > 10.0
        assert sum(1 for c in grey.histogram() if c) > 20  # many grey levels: text, widgets, anti-aliasing


@pytest.mark.timeout(400)
def test_explorer_renders_in_headless_chromium(browser, server: str, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    # the title is drawn by the app's script after the websocket session starts: wait for the real text
    WebDriverWait(browser, RENDER_S, poll_frequency=0.5).until(
        lambda d: any(TITLE in h.text for h in d.find_elements(By.TAG_NAME, "h1"))
    )
    shot = _screenshot(browser, tmp_path / "explorer.png", os.environ.get("EXPLORER_SCREENSHOT"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert TITLE in body
    assert "Simplex noise" in body  # the navigation lists the second page
    _assert_not_blank(shot)


def _type(driver, label_start: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    field = WebDriverWait(driver, 60, poll_frequency=0.5).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'input[aria-label^="{label_start}"]')
    )
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.ENTER)  # Enter commits a Streamlit text input and reruns the app


@pytest.mark.timeout(400)
def test_explorer_computes_a_map_in_the_browser(browser, server: str, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.engines._explore_helpers import make_checkpoints, write_volume

    make_checkpoints("anoddpm_simplex", tmp_path / "models")
    vol = write_volume(tmp_path / "sub-01_T1w.nii.gz", (48, 44, 12))
    browser.get(server)
    _type(browser, "Checkpoint folder", str(tmp_path / "models"))
    time.sleep(1.0)  # the rerun of the first field ends before the second is typed
    _type(browser, "... or a path on the server", str(vol))
    WebDriverWait(browser, RENDER_S, poll_frequency=0.5).until(
        lambda d: (
            "map max (volume)" in d.find_element(By.TAG_NAME, "body").text
            and len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')) >= 3
        )
    )
    env = os.environ.get("EXPLORER_SCREENSHOT")
    shot = _screenshot(
        browser, tmp_path / "explorer_map.png", env and str(Path(env).with_name(Path(env).stem + "_map.png"))
    )
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "sub-01_T1w.nii.gz: 48x44x12 voxels" in body and "t250" in body
    assert "Download the anomaly map" in body
    assert "Error" not in body and "Traceback" not in body
    _assert_not_blank(shot)
