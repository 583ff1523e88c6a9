"""Cost of the finite check on load: UNet.from_pretrained with check_finite True vs False, alternating, best of 5.

    python tools/bench_finite_check.py

The model is SD 1.5's UNet layout at half its widths (random weights), saved once to a
temporary folder; both loads read it from the page cache, so the ratio is the check's share
of the CPU work of a load (a first read from disk makes the share smaller).
"""

import tempfile
import time
from pathlib import Path

import torch

from sdlearn.models.unet import UNet, UNetConfig


def main() -> None:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.sd15(block_out_channels=(160, 320, 640, 640)))
    n = sum(p.numel() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = unet.save_pretrained(Path(tmp) / "unet")
        times = {True: [], False: []}
        for _ in range(5):
            for check in (False, True):
                began = time.perf_counter()
                UNet.from_pretrained(folder, check_finite=check)
                times[check].append(time.perf_counter() - began)
    without, with_check = min(times[False]), min(times[True])
    print(f"{n / 1e6:.0f} M parameters, {torch.get_num_threads()} threads: load {without:.2f} s without the check, "
          f"{with_check:.2f} s with it (+{100 * (with_check / without - 1):.0f}%, {1e9 * (with_check - without) / n:.2f} s per 1e9 parameters)")


if __name__ == "__main__":
    main()
