"""The samplers under their public name `sdlearn.samplers`: the algorithms are in
`sdlearn/diffusion/samplers.py`, their construction from diffusers configs in
`sdlearn/diffusion/scheduler_configs.py`.
"""

from sdlearn.diffusion.samplers import (  # noqa: F401 (re-exported)
    FLOW_SAMPLER_NAMES,
    PREDICTION_TYPES,
    SAMPLERS,
    SAMPLER_NAMES,
    SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    FlowEulerSampler,
    PLMSSampler,
    Prediction,
    Sampler,
    StepOutput,
    config_keys,
    ddim_invert,
    sample,
)
from sdlearn.diffusion.scheduler_configs import (  # noqa: F401 (re-exported)
    SAMPLER_FOR_SCHEDULER,
    get_sampler,
    sampler_from_config,
)
from sdlearn.models.noise import randn  # noqa: F401 (re-exported)
