"""A tiny text-conditional UNet trained by sdlearn.train.train(), for tests/test_accelerate.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/accelerate_script.py OUT_FOLDER
    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_script.py OUT_FOLDER   (the same, on a CPU)

Every process trains; the main process writes into OUT_FOLDER:

    right.pt    the weights after STEPS steps on the global batches of `batches` (BATCH = 8 rows:
                with 2 processes, rows 0-3 on rank 0 and rows 4-7 on rank 1)
    resumed.pt  the right run, stopped after step 2 (a checkpoint folder in OUT_FOLDER/state) and resumed
    wrong.pt    the same run, but each process's global batch is rolled by rank * BATCH / 2 rows,
                so that BOTH processes train on rows 0-3 (a wrong split: rows 4-7 are never seen)
    info.json   the number of processes, the rows each loss call saw, the History's losses, and the error train() raised
                for a loss that bypasses the gradient average (it calls unet.forward)

The test compares these with one process training on the whole batch (the functions below,
imported by the test, define the same model, data and loss for both).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from sdlearn.ddpm import DiffusionLoss
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.train import train

# lr 1e-4: Adam divides each gradient by its own size, so an element whose gradient is ~1e-9 turns
# rounding in the gradient (summed in another order by 2 processes) into a step change of ~0.1 lr.
BATCH, STEPS, LR, TEXT_WIDTH = 8, 3, 1e-4, 8


def tiny_unet() -> UNet:
    """Two levels over 8x8 latents with cross-attention at both (mini-SD's layout, much narrower)."""
    torch.manual_seed(0)
    return UNet(UNetConfig(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        layers_per_block=1, attention_head_dim=4, cross_attention_dim=TEXT_WIDTH, norm_num_groups=4,
    ))


def batches(step: int):
    """data(step): the global batch (z_0, t, eps, context); it carries its own noise, so the loss is deterministic."""
    g = torch.Generator().manual_seed(1000 + step)
    z0 = torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.randint(1000, (BATCH,), generator=g)
    eps = torch.randn(BATCH, 4, 8, 8, generator=g)
    context = torch.randn(BATCH, 3, TEXT_WIDTH, generator=g)  # 3 "tokens" per caption
    return z0, t, eps, context


class CountingLoss(DiffusionLoss):
    """DiffusionLoss that also records how many rows each call saw."""

    def __init__(self):
        super().__init__(NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear"))
        self.rows = []

    def __call__(self, unet, batch):
        self.rows.append(int(batch[0].shape[0]))
        return super().__call__(unet, batch)


def run(data=batches, **kwargs) -> tuple:
    """(trained UNet, loss, History) after STEPS steps on `data`."""
    unet, loss = tiny_unet(), CountingLoss()
    history = train(unet, loss, data, steps=STEPS, lr=LR, progress=False, **kwargs)
    return unet, loss, history


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unet, loss, history = run()
    state = PartialState()  # the processes train() ran in
    rank, processes = state.process_index, state.num_processes

    def rolled(step):  # the wrong split: rank r's slice of this batch is rows 0-3 for every r
        return tuple(x.roll(rank * BATCH // processes, dims=0) for x in batches(step))

    wrong, *_ = run(rolled)
    # interrupted after step 2 (an accelerate state folder), then resumed to STEPS
    folder = out / "state"
    train(tiny_unet(), CountingLoss(), batches, steps=2, lr=LR, progress=False, checkpoint=folder)
    resumed, *_ = run(checkpoint=folder, resume=True)

    # a loss that calls unet.forward (not unet): no gradient average, train() must stop after step 1
    class Bypass(CountingLoss):
        def __call__(self, unet, batch):
            return super().__call__(unet.forward, batch)

    try:
        train(tiny_unet(), Bypass(), batches, steps=STEPS, lr=LR, progress=False)
        bypass_error = None
    except RuntimeError as e:
        bypass_error = str(e)
    if rank == 0:
        torch.save(unet.state_dict(), out / "right.pt")
        torch.save(wrong.state_dict(), out / "wrong.pt")
        torch.save(resumed.state_dict(), out / "resumed.pt")
        backend = torch.distributed.get_backend() if processes > 1 else None
        info = {"processes": processes, "backend": backend, "rows": loss.rows, "losses": history.losses,
                "bypass_error": bypass_error}
        (out / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
