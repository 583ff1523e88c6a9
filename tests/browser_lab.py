"""Drive the lessons in a real JupyterLab in a real browser (Debian's Chromium through Playwright).

Used by tests/test_browser.py. JupyterLab runs from this environment on a free loopback port
with a random token, in a temporary folder holding copies of the lessons (the committed
notebooks are never touched), with its own settings folder: no news or update prompt, and
every cell rendered (no windowing), so that each widget can be found in the page.

The page exposes JupyterLab's application object (`expose_app_in_browser`): the tests use it
to run commands (Run All, save) and to read cell states, as JupyterLab's own UI tests do;
they move sliders with the mouse and pick dropdown entries as a learner would.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """Debian's Chromium (or SDLEARN_CHROMIUM): never a browser downloaded by `playwright install`."""
    explicit = os.environ.get("SDLEARN_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAB_SETTINGS = {
    # no "Would you like to get notified about official Jupyter news?" prompt, no update check
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    # render every cell, so that every widget is in the page
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


class Lab:
    """A JupyterLab server in `root` (a context manager): `url(path)` gives a page address with the token."""

    def __init__(self, root: Path, log: Path):
        self.root = Path(root)
        self.port = free_port()
        self.token = os.urandom(12).hex()
        self.log_path = Path(log)
        settings = self.root.parent / "lab-settings"
        for name, value in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.command = [
            sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.root.parent / 'lab-workspaces'}", "--LabApp.news_url=",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self.command.append("--allow-root")  # containers and CI run as root
        self.process = None

    def url(self, path: str = "lab") -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def __enter__(self) -> "Lab":
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within 120 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


# What the page is asked (JupyterLab's application object) -----------------------------------

CELL_STATES = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets;
  return cells.map((cell, index) => {
    const model = cell.model;
    if (model.type !== 'code') return {index, type: model.type};
    const outputs = [];
    for (let i = 0; i < model.outputs.length; i++) {
      const out = model.outputs.get(i).toJSON();
      outputs.push({type: out.output_type, mimes: Object.keys(out.data || {}), ename: out.ename, evalue: out.evalue,
                    name: out.name});
    }
    return {index, type: 'code', count: model.executionCount, running: cell.node.querySelector('.jp-InputPrompt').textContent.includes('*'),
            source: model.sharedModel.getSource(), outputs};
  });
}"""

KERNEL_STATUS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return kernel ? kernel.status : 'none';
}"""


def open_notebook(page, lab: Lab, name: str, timeout_s: float = 120) -> None:
    """Open a notebook and wait until its kernel is idle."""
    # a workspace of its own: nothing another page left open (a dialog, a closed kernel) is restored here
    page.goto(lab.url(f"lab/workspaces/w{os.urandom(4).hex()}/tree/{name}"))
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                           "window.jupyterapp.shell.currentWidget.content && "
                           "window.jupyterapp.shell.currentWidget.content.widgets.length > 0", timeout=timeout_s * 1000)
    wait_for_kernel(page, timeout_s)


def wait_for_kernel(page, timeout_s: float) -> None:
    page.wait_for_function(f"() => ({KERNEL_STATUS})() === 'idle'", timeout=timeout_s * 1000)


def command(page, name: str, args: dict | None = None):
    return page.evaluate("([name, args]) => window.jupyterapp.commands.execute(name, args)", [name, args or {}])


def run_all(page, timeout_s: float) -> list:
    """Run All and wait until every code cell has run (or one failed); returns the cell states."""
    command(page, "notebook:run-all-cells")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        states = page.evaluate(CELL_STATES)
        code = [c for c in states if c["type"] == "code"]
        failed = any(o["type"] == "error" for c in code for o in c["outputs"])
        if failed or (all(c["count"] for c in code) and not any(c["running"] for c in code)
                      and page.evaluate(KERNEL_STATUS) == "idle"):
            return states
    raise TimeoutError(f"Run All did not finish within {timeout_s:.0f} s")


# Checking one widget as a learner uses it --------------------------------------------------

WIDGET_STATE = """(root) => ({
  images: Array.from(root.querySelectorAll('img.widget-image')).map(img => ({
      src: img.src, natural: [img.naturalWidth, img.naturalHeight], shown: [img.clientWidth, img.clientHeight]})),
  labels: Array.from(root.querySelectorAll('.widget-html-content')).map(el => el.textContent),
  readout: (root.querySelector('.widget-readout') || {}).textContent || null,
})"""


def widget_state(root) -> dict:
    return root.evaluate(WIDGET_STATE)


def wait_for_change(root, before: dict, what: str, timeout_s: float = 15) -> dict:
    """Poll the widget until its images and labels differ from `before` (the kernel answers a slider move)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = widget_state(root)
        if [i["src"] for i in now["images"]] != [i["src"] for i in before["images"]] and now["labels"] != before["labels"]:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{what}: the picture or the label did not change within {timeout_s:.0f} s "
                         f"(labels before {before['labels']}, after {widget_state(root)['labels']})")


def settle(root, timeout_s: float = 15) -> dict:
    """The widget's state once the kernel has caught up (two readings 0.4 s apart agree)."""
    deadline = time.monotonic() + timeout_s
    state = widget_state(root)
    while time.monotonic() < deadline:
        time.sleep(0.4)
        again = widget_state(root)
        if again == state:
            return state
        state = again
    return state


def drag_slider(page, root, fraction: float) -> None:
    """Drag the first slider's handle with the mouse to `fraction` of its track."""
    handle = root.locator(".noUi-handle").first
    track = root.locator(".noUi-target").first.bounding_box()
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()


def check_widget(page, root, name: str, screenshots: Path, timeout_s: float = 15) -> list:
    """Check one rendered widget as a learner uses it; returns the list of checks done (raises on a failure)."""
    done = []
    text = root.inner_text()
    assert "Error displaying widget" not in text and "VBox(children" not in text, f"{name}: not rendered: {text[:200]}"
    root.scroll_into_view_if_needed()
    before = widget_state(root)
    assert before["images"] and all(i["natural"][0] > 0 for i in before["images"]), f"{name}: an image did not load"
    for image in before["images"]:  # drawn at the PNG's own size: no stretched plot, no shrunken panel
        assert abs(image["shown"][0] - image["natural"][0]) <= 1 and abs(image["shown"][1] - image["natural"][1]) <= 1, \
            f"{name}: an image of {image['natural']} pixels is shown at {image['shown']}"
    done.append("renders (no error, no raw text), every image at its own size")
    root.screenshot(path=str(screenshots / f"{name}-0-rendered.png"))

    if root.locator(".noUi-handle").count():
        track = root.locator(".noUi-target").first.bounding_box()
        handle = root.locator(".noUi-handle").first.bounding_box()
        at = (handle["x"] + handle["width"] / 2 - track["x"]) / track["width"]
        drag_slider(page, root, 0.1 if at > 0.5 else 0.8)  # well away from where a lesson cell left it
        wait_for_change(root, before, f"{name}: dragging the slider", timeout_s)
        after = settle(root)
        assert after["readout"] != before["readout"], f"{name}: the slider's readout did not move"
        if any(label.startswith("step ") for label in after["labels"]):  # one step numbering everywhere
            assert any(label.startswith(f"step {after['readout']} of") for label in after["labels"]), \
                f"{name}: the slider reads {after['readout']} but the label says {after['labels']}"
            done.append("slider readout and label show the same step")
        done.append("dragging the slider changes the picture, the label and the readout")
        root.screenshot(path=str(screenshots / f"{name}-1-slider.png"))
        before = after

    if root.locator(".widget-play").count():
        drag_slider(page, root, 0.0)  # back to the first step, then play
        wait_for_change(root, before, f"{name}: dragging the slider back")
        before = settle(root)
        root.locator(".widget-play button").first.click()
        after = wait_for_change(root, before, f"{name}: pressing play")
        time.sleep(1.0)
        later = widget_state(root)
        assert int(later["readout"]) > int(after["readout"]) > int(before["readout"]), \
            f"{name}: play did not advance the frames ({before['readout']} -> {after['readout']} -> {later['readout']})"
        root.locator(".widget-play button:has(i.fa-stop)").click()
        stopped = settle(root)
        time.sleep(0.6)
        assert widget_state(root)["readout"] == stopped["readout"], f"{name}: the stop button did not stop the play"
        done.append("play advances the frames, stop stops them")

    if root.locator("select").count():
        select = root.locator("select").first
        current, count = select.evaluate("s => [s.selectedIndex, s.options.length]")
        before = widget_state(root)
        select.select_option(index=count - 1 if current != count - 1 else 0)  # the last token (or the first)
        wait_for_change(root, before, f"{name}: choosing from the dropdown")
        done.append("choosing from the dropdown changes the picture and the label")
        root.screenshot(path=str(screenshots / f"{name}-2-dropdown.png"))
    return done
