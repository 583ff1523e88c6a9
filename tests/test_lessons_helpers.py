"""sdlearn.lessons: the tables lessons print are derived from the package and match the published layouts."""

import torch

from sdlearn.lessons import COMPVIS_CLASSES, compvis_unet_names
from sdlearn.unet import UNet, UNetConfig


def test_compvis_names_of_sd15_match_the_original_checkpoints():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    rows = compvis_unet_names(unet)
    theirs = {ours: compvis for ours, compvis, _, _ in rows}
    # names as they appear in the released v1-5-pruned.ckpt (model.diffusion_model.*)
    assert theirs == {**theirs, "time_embedding": "time_embed", "conv_in": "input_blocks.0.0",
                      "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
                      "down_blocks.0.downsamplers.0": "input_blocks.3.0.op", "down_blocks.3.resnets.1": "input_blocks.11.0",
                      "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                      "mid_block.resnets.1": "middle_block.2", "up_blocks.0.upsamplers.0": "output_blocks.2.1.conv",
                      "up_blocks.1.attentions.2": "output_blocks.5.1", "up_blocks.1.upsamplers.0": "output_blocks.5.2.conv",
                      "up_blocks.3.resnets.2": "output_blocks.11.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    assert len(rows) == len(theirs) == 48
    assert [c for _, c, _, _ in rows].index("middle_block.0") > [c for _, c, _, _ in rows].index("input_blocks.11.0")
    classes = {ours_class: compvis_class for _, _, ours_class, compvis_class in rows}
    assert classes["Transformer2DModel"] == "SpatialTransformer" and classes["ResnetBlock2D"] == "ResBlock"
    assert set(COMPVIS_CLASSES) <= set(classes)
