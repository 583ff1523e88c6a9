"""Test tiers: `gpu` tests need CUDA, `weights` tests need real weights (SDLEARN_SD_MODEL)."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_weights = pytest.mark.skip(reason="needs real weights: set SDLEARN_SD_MODEL to a Stable Diffusion folder or file")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "weights" in item.keywords and not os.environ.get("SDLEARN_SD_MODEL"):
            item.add_marker(no_weights)
