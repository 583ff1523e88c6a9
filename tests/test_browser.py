"""The lessons' widgets in a real JupyterLab in a real browser (marker `browser`).

For every lesson with a widget: open it in JupyterLab, Run All, wait for the kernel, then for
every widget check that it rendered (no error text, no raw repr, images at their own size),
that dragging its slider with the mouse (and choosing from its dropdown) changes its picture
and its label, that its play button advances the frames, and that the browser logged no
error. Each widget cell must also leave its saved picture. Screenshots of every widget go to
build/browser/ for a person to look at.

Run All here replaces the notebook's nbval run (conftest.py leaves those cells out when this
file runs): a failing cell fails the test as it would fail nbval.

Needs Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it); the tests say in
one line why they were skipped without it. Run them alone with `pytest -m browser`.
"""

import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from browser_lab import CELL_STATES, Lab, check_widget, command, find_chromium, open_notebook, run_all
from sdlearn.widgets import widget_cells

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = ROOT / "build" / "browser"
CHROMIUM = find_chromium()
WIDGET_LESSONS = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if widget_cells(nbformat.read(p, as_version=4).cells))
SKIP_REASON = ("browser tests skipped: Debian's Chromium is not installed (apt-get install chromium, "
               "or set SDLEARN_CHROMIUM to its path); .ci/run installs it")
RUN_ALL_TIMEOUT_S = 900

pytestmark = pytest.mark.browser
if CHROMIUM is None:  # one line in the summary, and nbval runs the four lessons instead (conftest.py)
    pytest.skip(SKIP_REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab") / "lessons"
    root.mkdir()
    for name in WIDGET_LESSONS:  # copies: the committed notebooks are never touched
        shutil.copy(NOTEBOOKS / name, root / name)
    with Lab(root, root.parent / "jupyterlab.log") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses its sandbox as root (CI)
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield chromium
        chromium.close()


def new_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.console_errors.append(f"uncaught: {error}"))
    return page


@pytest.fixture(scope="module")
def lessons_run(lab, browser):
    """Run All each lesson once, in its own page, on first use; the tests below share the pages."""
    pages = {}

    def run(name: str):
        if name not in pages:
            page = new_page(browser)
            open_notebook(page, lab, name)
            began = time.monotonic()
            states = run_all(page, RUN_ALL_TIMEOUT_S)
            pages[name] = (page, states, time.monotonic() - began)
        return pages[name]

    yield run
    for page, _, _ in pages.values():
        page.context.close()


def test_the_widget_lessons_are_found():
    assert WIDGET_LESSONS == ["03_forward_noising.ipynb", "04_ddpm_from_scratch.ipynb", "09_text_to_image.ipynb",
                              "11_real_stable_diffusion.ipynb"]


@pytest.mark.parametrize("name", WIDGET_LESSONS)
def test_every_widget_works_in_the_browser_after_run_all(lessons_run, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expected = widget_cells(nbformat.read(NOTEBOOKS / name, as_version=4).cells)
    page, states, seconds = lessons_run(name)
    errors = [(c["index"], o["ename"], o["evalue"]) for c in states if c["type"] == "code" for o in c["outputs"] if o["type"] == "error"]
    assert not errors, f"{name}: a cell failed in Run All: {errors}"
    not_run = [c["index"] for c in states if c["type"] == "code" and c["source"].strip() and not c["count"]]
    assert not not_run, f"{name}: cells {not_run} did not run"
    report = [f"{name}: Run All in {seconds:.0f} s"]
    for index in expected:
        outputs = states[index]["outputs"]
        mimes = [set(o["mimes"]) for o in outputs]
        assert any("application/vnd.jupyter.widget-view+json" in m for m in mimes), f"{name} cell {index}: no widget output"
        assert any("image/png" in m for m in mimes), f"{name} cell {index}: no saved picture beside the widget"
        checks = check_widget(page, widget_root(page, index), f"{name[:2]}-cell{index:02d}", SCREENSHOTS)
        report.append(f"  cell {index}: " + "; ".join(checks))
    assert not page.console_errors, f"{name}: the browser logged errors: {page.console_errors[:5]}"
    print("\n".join(report))


def widget_root(page, index: int):
    root = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output .widget-vbox").first
    root.wait_for(state="visible", timeout=30_000)
    return root


def test_the_checks_fail_on_a_widget_whose_slider_is_disconnected(lessons_run, tmp_path):
    """The checks can fail: lesson 03's noise explorer, its slider callback removed in the kernel, is caught."""
    name = WIDGET_LESSONS[0]
    page, _, _ = lessons_run(name)
    index = widget_cells(nbformat.read(NOTEBOOKS / name, as_version=4).cells)[0]
    page.evaluate("""async (code) => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        await kernel.requestExecute({code}).done;
    }""", "explorer.slider.unobserve_all('value')  # the callback is disconnected")
    with pytest.raises(AssertionError, match="did not change"):
        check_widget(page, widget_root(page, index), "broken", tmp_path, timeout_s=5)


def test_a_reopened_notebook_shows_the_saved_pictures(lessons_run):
    """After a run is saved and its kernel has gone, each widget cell still shows its picture."""
    name = WIDGET_LESSONS[0]
    page, _, _ = lessons_run(name)
    command(page, "docmanager:save")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)
    command(page, "kernelmenu:shutdown")  # the kernel goes, as when JupyterLab is closed
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.sessionContext.session || "
                           "!window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=30_000)
    page.reload()
    cells = nbformat.read(NOTEBOOKS / name, as_version=4).cells
    page.wait_for_function(f"() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                           f"window.jupyterapp.shell.currentWidget.content && "
                           f"window.jupyterapp.shell.currentWidget.content.widgets.length === {len(cells)}", timeout=120_000)
    states = page.evaluate(CELL_STATES)
    for index in widget_cells(cells):
        assert any("image/png" in o["mimes"] for o in states[index]["outputs"])
        picture = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-RenderedImage img").first
        picture.wait_for(state="visible", timeout=30_000)
        assert picture.evaluate("img => img.naturalWidth") > 100
    first = page.locator(".jp-Notebook .jp-Cell").nth(widget_cells(cells)[0])
    first.scroll_into_view_if_needed()
    first.screenshot(path=str(SCREENSHOTS / f"{name[:2]}-reopened.png"))
    print(f"{name} reopened, the first widget cell's outputs read: {first.locator('.jp-OutputArea').inner_text()[:300]!r}")
