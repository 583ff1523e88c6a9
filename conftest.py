"""Settings for every test, notebooks included (tests/conftest.py holds the test tiers).

Notebook tests (nbval): give the kernel time to deliver a cell's outputs on a busy CPU.
nbval waits for each cell's reply with `--nbval-cell-timeout` (600 s here), but then waits
for every output message (progress bars, figures) with a fixed 5 s that has no option
(nbval issues #136 and #231). On a loaded 2-core runner a training cell's last outputs can
arrive later than that, and nbval then fails the cell although it ran. We raise that wait.

Lessons with widgets run in a real browser (tests/test_browser.py) when Chromium is installed:
their nbval cells are then left out, since Run All in JupyterLab runs the same cells.

Order: long files first (the browser tests, then the notebooks by their recorded run time), so
that pytest-xdist, which hands files to workers in collection order, ends with short ones.

Workers: `make test` runs pytest with one worker process per CPU core (pytest-xdist, `-n auto
--dist loadfile`: a file, or a notebook's cells, stays on one worker, in order). Each worker
then uses one torch thread, and so do the notebook kernels it starts (they inherit
OMP_NUM_THREADS): two workers with two threads each would fight over a 2-core CPU.
"""

import os

import pytest

NBVAL_OUTPUT_TIMEOUT = 120  # seconds between two output messages of one notebook cell

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it will (e.g. -m "not browser")
def pytest_collection_modifyitems(config, items):
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
    run_in_browser = _lessons_run_in_the_browser(items)
    if run_in_browser:
        kept = [item for item in items
                if not (type(item).__name__ == "IPyNbCell" and os.path.basename(str(item.fspath)) in run_in_browser)]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    items.sort(key=_longest_first)  # stable: each file's own order is kept


def _longest_first(item) -> tuple:
    """Start the long files first, so that short ones fill the workers' tails (pytest-xdist hands out
    files in this order): the browser tests, then the notebooks by their recorded run time, then the rest."""
    name = os.path.basename(str(item.fspath))
    if name == "test_browser.py":
        return (0, 0.0)
    if name.endswith(".ipynb"):
        return (1, -_recorded_seconds().get(name, 0.0))
    return (2, 0.0)


def _recorded_seconds() -> dict:
    global _SECONDS
    if _SECONDS is None:
        import json

        folder = os.path.join(os.path.dirname(__file__), "notebooks")
        _SECONDS = {}
        for name in os.listdir(folder):
            if name.endswith(".ipynb"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    _SECONDS[name] = json.load(f).get("metadata", {}).get("sdlearn", {}).get("seconds", 0.0)
    return _SECONDS


_SECONDS = None


def _lessons_run_in_the_browser(items) -> set:
    """Notebooks whose browser test (tests/test_browser.py) will Run All them: nbval need not run them again.

    Run All in JupyterLab executes every cell and fails on any error, as nbval does here
    (--nbval-lax, no pinned outputs), so running both would only spend the time twice.
    """
    names = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("browser") and "name" in params and not item.get_closest_marker("skip") and \
                not any(mark.args and mark.args[0] for mark in item.iter_markers("skipif")):
            names.add(params["name"])
    return names
