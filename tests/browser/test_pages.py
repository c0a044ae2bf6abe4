"""Open every page of the built website in headless chromium and check that it works offline.

Run by `make browser` (after `make book`) inside a network namespace with loopback only, so a page
that still needs a CDN fails. Per page: every math element is typeset by MathJax and no raw TeX is
left in the text, every <img> has a non-empty file and decodes, the console shows no errors and no
uncaught exceptions, nothing is requested from outside 127.0.0.1, and widgets saved with the page
are rendered by the vendored widget manager (and only saved where shown). A full-page screenshot goes to
_build/screenshots/<page>.png, also for pages that fail.

The browser is driven over the Chrome DevTools Protocol on a pipe (--remote-debugging-pipe):
JSON messages ended by a NUL byte, written to chromium's fd 3 and read from its fd 4. That needs
only the standard library; no driver or browser download.
"""

import base64
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [  # headless, and quiet: no first-run UI, no background requests of its own
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1280,1600",
]
WIDTH, MAX_HEIGHT = 1280, 30000  # longer pages are cut there (a bitmap side is at most 32767 px)
PAGE_TIMEOUT = 60  # seconds to load a page and typeset its math
RAW_TEX = re.compile(r"\$\$|\\\[|\\\(|\\begin\{|\$[^$\s][^$\n]*?\\[A-Za-z]+[^$\n]*?\$")


def toc_pages():
    """The pages of _toc.yml, in order, as paths without suffix (book/intro, chapters/01_ddpm, ...)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return pages


class Chrome:
    """Headless chromium and a blocking DevTools-protocol client on its debugging pipe."""

    def __init__(self, profile_dir):
        commands_read, commands_write = os.pipe()  # we write, chromium reads on its fd 3
        answers_read, answers_write = os.pipe()  # chromium writes on its fd 4, we read
        # Chromium's ends moved to fds >= 10, so that the bash line below can put them at 3 and 4
        # without one clobbering the other.
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, answers_write))
        os.close(commands_read)
        os.close(answers_write)
        self._to_chrome = os.fdopen(commands_write, "wb")
        self._from_chrome = answers_read
        self._log = Path(profile_dir) / "chromium.log"  # its stderr, shown if it dies
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-',
                "bash",
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(child_in, child_out),
            stdout=subprocess.DEVNULL,
            stderr=self._log.open("wb"),
        )
        os.close(child_in)
        os.close(child_out)
        self._buf = bytearray()
        self._id = 0
        self.events = []  # protocol events received so far, in order

    def _receive(self, deadline):
        while (end := self._buf.find(b"\0")) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise self._died()
            self._buf += chunk
        message = json.loads(self._buf[:end])
        del self._buf[: end + 1]
        return message

    def send(self, method, session=None, timeout=30, **params):
        """Call a protocol method and return its result; events that arrive meanwhile are kept."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            self._to_chrome.write(json.dumps(message).encode() + b"\0")
            self._to_chrome.flush()
        except BrokenPipeError:
            raise self._died() from None
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def _died(self):
        self.proc.wait(timeout=10)
        log = self._log.read_text(errors="replace")[-3000:]
        return RuntimeError(f"chromium exited with status {self.proc.returncode}; its stderr ends:\n{log}")

    def wait_for(self, event, session, timeout):
        deadline = time.monotonic() + timeout
        while not any(e["method"] == event and e.get("sessionId") == session for e in self.events):
            self.events.append(self._receive(deadline))

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._to_chrome.close()
        os.close(self._from_chrome)


# Runs in the page once it has loaded: waits for MathJax's first typeset and the web fonts, then
# reports what the checks need. Code (pre, code) is left out of the text: it may hold "$" legitimately.
INSPECT = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;
  // Widgets saved with the page: the manager renders them after load; give it up to 15 s.
  const widgetStates = document.querySelectorAll('script[type="application/vnd.jupyter.widget-state+json"]');
  const widgetViews = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  for (let i = 0; i < 150 && widgetViews.length &&
       document.querySelectorAll(".jupyter-widgets").length === 0; i++)
    await new Promise(r => setTimeout(r, 100));
  await new Promise(r => setTimeout(r, widgetViews.length ? 500 : 0));  // the views' images decode
  const main = document.querySelector("main") || document.body;
  const prose = main.cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, mjx-container").forEach(e => e.remove());
  const math = [...document.querySelectorAll(".math")];
  // TeX errors: MathJax typesets a bad formula as <merror> and an undefined macro as red <mtext>.
  const mathErrors = [];
  for (const item of (window.MathJax && MathJax.startup && MathJax.startup.document || {}).math || []) {
    item.root.walkTree(node => {
      if (node.isKind("merror") || (node.isKind("mtext") && node.attributes.get("mathcolor") === "red"))
        mathErrors.push(item.math.slice(0, 80));
    });
  }
  return {
    mathjax: !!(window.MathJax && MathJax.version),
    math: math.length,
    typeset: document.querySelectorAll("mjx-container").length,
    untypeset: math.filter(e => !e.querySelector("mjx-container")).map(e => e.textContent.slice(0, 80)),
    mathErrors,
    prose: prose.textContent,
    images: [...document.images].map(i => ({src: i.getAttribute("src") || "", complete: i.complete,
                                               width: i.naturalWidth})),
    widgetStates: widgetStates.length,
    widgetViews: widgetViews.length,
    widgetsRendered: document.querySelectorAll(".jupyter-widgets").length,
    // code lines wider than the code column (the reader would have to scroll them into view)
    cutCode: [...document.querySelectorAll("div.cell_input pre")]
      .filter(e => e.scrollWidth > e.clientWidth + 1)
      .map(e => e.textContent.split("\\n").reduce((a, b) => (b.length > a.length ? b : a)).slice(0, 90)),
    height: document.documentElement.scrollHeight,
  };
})()"""


def visit(chrome, url, screenshot=None, expression=INSPECT):
    """Load url in a fresh tab and run ``expression`` (a JavaScript promise) in it; return its value
    and the page's protocol events. A full-page screenshot goes to ``screenshot`` if given (the value
    must then have the page's ``height``)."""
    target = chrome.send("Target.createTarget", url="about:blank")["targetId"]
    session = chrome.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            chrome.send(f"{domain}.enable", session)
        chrome.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=WIDTH,
            height=1600,
            deviceScaleFactor=1,
            mobile=False,
        )
        chrome.send("Page.navigate", session, url=url)
        chrome.wait_for("Page.loadEventFired", session, PAGE_TIMEOUT)
        report = chrome.send(
            "Runtime.evaluate",
            session,
            timeout=PAGE_TIMEOUT,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in report:
            raise RuntimeError(f"inspecting {url} failed: {report['exceptionDetails']}")
        report = report["result"].get("value")
        if screenshot is None:
            return report, [e for e in chrome.events if e.get("sessionId") == session]
        shot = chrome.send(
            "Page.captureScreenshot",
            session,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": min(report["height"], MAX_HEIGHT), "scale": 1},
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return report, [e for e in chrome.events if e.get("sessionId") == session]
    finally:
        chrome.send("Target.closeTarget", targetId=target)
        chrome.events = [e for e in chrome.events if e.get("sessionId") != session]


def js_errors(events):
    """Console errors, uncaught exceptions and failed loads, as readable lines."""
    errors = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append(
                "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            if p["entry"].get("url", "").endswith("/favicon.ico"):
                continue  # the browser asks for one by itself; the book declares none
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}".strip())
    return errors


def external_requests(events):
    """Requests that leave the local server (data:, blob: and about: URLs never touch a network)."""
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return [
        u
        for u in urls
        if urlsplit(u).scheme not in ("data", "blob", "about") and urlsplit(u).hostname != "127.0.0.1"
    ]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test output
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(base URL of _build/html served on 127.0.0.1, a running Chrome)."""
    if not (HTML / "index.html").exists():
        pytest.fail("no built website: run `make book` first")
    if not CHROMIUM:
        pytest.fail("chromium not found: install it (Debian: apt-get install chromium) or set CHROMIUM")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=HTML)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chrome = Chrome(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", chrome
    finally:
        chrome.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("page", toc_pages())
def test_page_works_offline(site, page):
    base, chrome = site
    path = HTML / f"{page}.html"
    assert path.exists(), f"{page} is in _toc.yml but {path} was not built"
    url = urljoin(base, f"{page}.html")
    report, events = visit(chrome, url, SHOTS / f"{page}.png")
    source = path.read_text(encoding="utf-8")

    problems = []
    if re.search(r'class="math[ "]', source):
        if not report["mathjax"]:
            problems.append("the page has math but MathJax did not load")
        if report["typeset"] == 0 or report["untypeset"]:
            problems.append(
                f"{report['math']} math elements, {report['typeset']} typeset; "
                f"not typeset: {report['untypeset'][:5]}"
            )
    if report["mathErrors"]:
        problems.append(f"TeX errors (bad formula or undefined macro) in: {report['mathErrors'][:5]}")
    # a table left as text: its "|---|" line (the typographer turns "---" into an em dash)
    if re.search(r"\|\s*(?:-{3,}|—)\s*\|", report["prose"]):
        problems.append("a Markdown table was left as text (a '|' inside a cell breaks it: escape it)")
    if raw := RAW_TEX.findall(report["prose"]):
        problems.append(f"raw TeX left in the text: {raw[:5]}")
    for img in report["images"]:
        src = img["src"]
        if not src:
            continue  # filled in by JavaScript later, e.g. an animation's frame
        if not src.startswith(("data:", "blob:")):  # blob: an image widget's bytes
            file = HTML / unquote(urlsplit(urljoin(url, src)).path.lstrip("/"))
            if not file.is_file() or file.stat().st_size == 0:
                problems.append(f"image file missing or empty: {src}")
        if not (img["complete"] and img["width"] > 0):
            problems.append(f"image did not load or decode: {src[:100]}")
    if report["widgetViews"] and not (report["widgetStates"] and report["widgetsRendered"]):
        problems.append(
            f"{report['widgetViews']} widget views, {report['widgetStates']} saved widget states, "
            f"{report['widgetsRendered']} widgets rendered: the widget manager did not render them"
        )
    if report["widgetStates"] and not report["widgetViews"]:
        problems.append("widget state is saved but no widget is shown: the page loads the manager for nothing")
    if report["cutCode"]:
        problems.append(
            f"code cells wider than the code column at {WIDTH} px (longest line shown): {report['cutCode'][:3]}"
        )
    problems += [f"JavaScript: {e}" for e in js_errors(events)]
    problems += [f"request outside 127.0.0.1: {u}" for u in external_requests(events)]
    assert not problems, f"{page} ({url}):\n  " + "\n  ".join(problems)


# After load: wait for the first slider widget, press the right arrow key on its handle, and report
# the slider's readout and the widget images before and after. Pages link sliders to their frames in
# the browser (jslink), so this must work from the saved widget state alone, with no kernel.
SLIDE = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  let handle = null;
  for (let i = 0; i < 150 && !(handle = document.querySelector(".widget-slider .noUi-handle")); i++)
    await sleep(100);
  if (!handle) return null;
  const box = handle.closest(".widget-box") || document;
  const state = () => ({
    readout: (handle.closest(".widget-slider").querySelector(".widget-readout") || {}).textContent,
    images: [...box.querySelectorAll("img.widget-image")].map(i => i.getAttribute("src")),
  });
  const before = state();
  handle.focus();
  handle.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}));
  await sleep(1000);
  return {before, after: state()};
})()"""


def test_widget_slider_works_offline(site):
    """Chapter 1's time slider: moving it shows another of its pre-drawn frames, offline."""
    base, chrome = site
    result, events = visit(chrome, urljoin(base, "chapters/01_ddpm.html"), expression=SLIDE)
    assert not js_errors(events), js_errors(events)
    assert result, "no slider widget rendered on Chapter 1's page"
    before, after = result["before"], result["after"]
    assert before["images"] and after["images"], f"no frame shown next to the slider: {result}"
    assert after["readout"] != before["readout"], f"the slider did not move: {result}"
    assert after["images"] != before["images"], f"the slider moved but the frame did not change: {result}"
