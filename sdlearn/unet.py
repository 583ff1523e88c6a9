"""The UNet, under its public name `sdlearn.unet`; the code is in `sdlearn/models/unet.py`."""

from sdlearn.models.unet import (  # noqa: F401 (re-exported)
    ADDITION_EMBED_TYPES,
    CLASS_EMBED_TYPES,
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    DownBlock,
    MidBlock,
    UNet,
    UNetConfig,
    UpBlock,
    config_dict_for_diffusers,
    skip_connections,
    trace_shapes,
)
