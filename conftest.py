"""Settings for every test, notebooks included (tests/conftest.py holds the test tiers).

Notebook tests (nbval): give the kernel time to deliver a cell's outputs on a busy CPU.
nbval waits for each cell's reply with `--nbval-cell-timeout` (600 s here), but then waits
for every output message (progress bars, figures) with a fixed 5 s that has no option
(nbval issues #136 and #231). On a loaded 2-core runner a training cell's last outputs can
arrive later than that, and nbval then fails the cell although it ran. We raise that wait.

Workers: `make test` runs pytest with one worker process per CPU core (pytest-xdist, `-n auto
--dist loadfile`: a file, or a notebook's cells, stays on one worker, in order). Each worker
then uses one torch thread, and so do the notebook kernels it starts (they inherit
OMP_NUM_THREADS): two workers with two threads each would fight over a 2-core CPU.
"""

import os

NBVAL_OUTPUT_TIMEOUT = 120  # seconds between two output messages of one notebook cell

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
