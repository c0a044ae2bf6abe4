"""Open Chapter 1 in JupyterLab as a reader would, offline, and run its first cells.

`make lab` opens `chapters/*.md` as notebooks through Jupytext; this test proves that door works:
it starts JupyterLab with the same viewer setting (binder/overrides.json, which `make lab` and
Binder use too), opens chapters/01_ddpm.md in headless chromium, checks that it shows as a
notebook (code cells, not Markdown text), runs its first code cells at DMLIB_PROFILE=test and
waits for their output.

Everything is isolated in a temporary folder: Jupyter's config, data, runtime and settings
directories, the workspace, and a copy of the chapter (so that nothing, not even an autosave,
writes to the checkout or to the user's home). Run by `make browser` inside tests/browser/offline.sh,
so JupyterLab, the kernel and the browser work with no network but loopback.

The browser is the system's chromium, driven by Playwright for Python with no browser download
(`executable_path`; never `playwright install`).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = "chapters/01_ddpm.md"
OVERRIDES = ROOT / "binder" / "overrides.json"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FIRST_CELLS = 2  # code cells to run
# Seconds, generous for a busy 2-core machine: JupyterLab starts in 20-40 s there, the kernel in
# ~10 s, and the first cells import torch and dmlib.
SERVER_TIMEOUT = 180
PAGE_TIMEOUT = 180
KERNEL_TIMEOUT = 180
CELL_TIMEOUT = 300
SHOT = ROOT / "_build" / "screenshots" / "jupyterlab-01_ddpm.png"

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # the system's chromium, always


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1, serving a copy of the chapter: yields (base URL, token, its folder)."""
    if not CHROMIUM:
        pytest.fail(
            "chromium not found: run `make sysdeps` (Debian: apt-get install chromium) or set CHROMIUM"
        )
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "root"
    (root / "chapters").mkdir(parents=True)
    shutil.copy(ROOT / CHAPTER, root / CHAPTER)
    # The viewer setting that `make lab` installs, plus test-only quiet: no autosave, no news or
    # update checks (they would ask the network and put a notification over the page).
    overrides = json.loads(OVERRIDES.read_text())
    overrides.setdefault("@jupyterlab/docmanager-extension:plugin", {})["autosave"] = False
    overrides["@jupyterlab/apputils-extension:notification"] = {
        "fetchNews": "false",
        "checkForUpdates": False,
    }
    app_settings = tmp / "app-settings"
    app_settings.mkdir()
    (app_settings / "overrides.json").write_text(json.dumps(overrides))

    env = dict(os.environ)
    for var, sub in [
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "user-settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "matplotlib"),
    ]:
        (tmp / sub).mkdir()
        env[var] = str(tmp / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["DMLIB_PROFILE"] = "test"  # the kernel inherits it: seconds per cell
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's kernel
    port, token = free_port(), os.urandom(16).hex()
    log = (tmp / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.app_settings_dir={app_settings}",
            "--LabApp.news_url=",
            "--LabServerApp.extension_manager=readonly",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"JupyterLab exited with status {proc.returncode}:\n{tail(tmp / 'jupyterlab.log')}"
                )
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > SERVER_TIMEOUT:
                pytest.fail(
                    f"JupyterLab did not answer in {SERVER_TIMEOUT} s:\n{tail(tmp / 'jupyterlab.log')}"
                )
            time.sleep(0.5)
        print(f"JupyterLab answered after {time.monotonic() - start:.1f} s")
        yield base, token, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def tail(path, n=3000):
    return Path(path).read_text(errors="replace")[-n:]


def test_chapter_runs_in_jupyterlab(lab):
    base, token, tmp = lab
    times = {}
    console_errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda e: console_errors.append(f"uncaught: {e}"))
            t0 = time.monotonic()
            page.goto(f"{base}/lab/tree/{CHAPTER}?reset&token={token}", timeout=PAGE_TIMEOUT * 1000)

            # The chapter opens as a notebook (Jupytext's viewer), not as Markdown text.
            cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")
            try:
                cells.first.wait_for(timeout=PAGE_TIMEOUT * 1000)
            except PlaywrightTimeout:
                shoot(page)
                editors = page.locator(".jp-FileEditor").count()
                pytest.fail(
                    f"{CHAPTER} did not open as a notebook in {PAGE_TIMEOUT} s "
                    f"({editors} text editors open: is the Jupytext viewer the default?); "
                    f"screenshot {SHOT}; server log:\n{tail(tmp / 'jupyterlab.log')}"
                )
            times["notebook shown"] = time.monotonic() - t0
            try:  # the notebook attaches its cells progressively
                cells.nth(FIRST_CELLS - 1).wait_for(state="attached", timeout=PAGE_TIMEOUT * 1000)
            except PlaywrightTimeout:
                pytest.fail(f"only {cells.count()} code cells shown, {FIRST_CELLS} expected")

            # The kernel (the notebook's python3 kernelspec, in this virtual environment) is ready.
            indicator = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
            try:
                expect(indicator).to_have_attribute("data-status", "idle", timeout=KERNEL_TIMEOUT * 1000)
            except AssertionError:
                shoot(page)
                raise
            times["kernel idle"] = time.monotonic() - t0

            outputs = []
            for i in range(FIRST_CELLS):
                cell = cells.nth(i)
                prompt = cell.locator(".jp-InputArea-prompt")
                # Select the cell (command mode, not editing) and run it, staying on it. On a busy
                # machine the first key press can reach the page before the notebook has focus and
                # be lost: the prompt then stays "[ ]:" with an idle kernel. Press again, a few times.
                for _ in range(3):
                    cell.locator(".jp-InputPrompt").click()
                    page.keyboard.press("Control+Enter")
                    try:
                        expect(prompt).not_to_have_text("[ ]:", timeout=10_000)
                        break
                    except AssertionError:
                        continue
                try:
                    expect(prompt).to_have_text(re.compile(r"\[\d+\]:"), timeout=CELL_TIMEOUT * 1000)
                except AssertionError:
                    shoot(page)
                    raise
                times[f"cell {i + 1} done"] = time.monotonic() - t0
                outputs.append(cell.locator(".jp-OutputArea").inner_text())
            shoot(page)
        finally:
            browser.close()
    print(
        "JupyterLab test, seconds since opening the page: "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
    )

    for i, text in enumerate(outputs, 1):
        assert "Traceback" not in text, f"code cell {i} failed:\n{text[-2000:]}"
    assert any(text.strip() for text in outputs), f"the first {FIRST_CELLS} code cells printed nothing"
    # The first cell imports dmlib and prints the active profile: the kernel saw DMLIB_PROFILE.
    assert re.search(r"profile\W+test", outputs[0]), f"first cell's output: {outputs[0]!r}"
    assert not console_errors, console_errors


def shoot(page):
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=str(SHOT))
    except Exception as e:  # a screenshot is a help, never the failure
        print(f"no screenshot: {e}")
