"""Real-browser test of `nailfold demo` (marker: browser).

Starts `nailfold demo` (synthetic scope, no camera, no GPU) on free ports, opens the page in Debian's
headless Chromium through Playwright, waits for live numbers, selects a capillary, checks that the
kymograph and the speed plot update, and saves a screenshot (NAILFOLD_SCREENSHOT_DIR or tmp).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install chromium)")]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    log = (tmp_path / "demo.log").open("w")   # a file, not an unread pipe that could fill up
    p = subprocess.Popen([sys.executable, "-m", "nailfold.cli", "demo", "--port", str(port), "--workdir",
                          str(tmp_path / "demo")], stdout=log, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    yield f"http://127.0.0.1:{port}", p
    p.send_signal(signal.SIGINT)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    try:   # whatever is left of the demo's process group (nothing, normally)
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()


def _kymo_src(page):
    return page.eval_on_selector("#kymo img", "e => e.src") if page.query_selector("#kymo img") else None


def test_demo_in_a_real_browser(demo, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    url, proc = demo
    shots = Path(os.environ.get("NAILFOLD_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1150})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                page.goto(url, timeout=5000)
                break
            except Exception:
                time.sleep(0.5)
        # live numbers: a flow speed appears in the selected capillary's panel
        page.wait_for_function(
            "() => { const e = document.querySelector('#cap-stats'); return e && /\\d+ (µm\\/s|px\\/frame)/.test(e.innerText); }",
            timeout=90_000)
        t_live = time.monotonic() - t_start
        assert "live" in page.inner_text("#health")
        # select another capillary through the dropdown
        page.click("#cap-select input")
        options = page.query_selector_all("[role='option']")
        assert len(options) >= 2, "expected several capillaries"
        chosen = options[1].inner_text().strip()
        options[1].click()
        page.wait_for_function(
            f"() => document.querySelector('#cap-stats').innerText.includes('Capillary {chosen}')", timeout=10_000)
        k1 = _kymo_src(page)
        time.sleep(2.0)
        k2 = _kymo_src(page)
        assert k1 and k2 and k1 != k2, "kymograph did not update"
        n_points = page.eval_on_selector("#speed-plot", "e => e.querySelectorAll('path, circle, line').length")
        assert n_points > 0
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
        browser.close()
    assert proc.poll() is None, "demo died"
    print(f"live numbers after {t_live:.1f} s")
