"""Settings for every test, notebooks included (tests/conftest.py holds the test tiers).

`make test` runs pytest with one worker process per CPU core (pytest-xdist, `-n auto --dist
loadfile`: a file, or a notebook's cells, stays on one worker, in order). Each worker then
uses one torch thread, and so do the notebook kernels it starts (they inherit
OMP_NUM_THREADS): two workers with two threads each would fight over a 2-core CPU.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
