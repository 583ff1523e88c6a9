"""Samplers from diffusers scheduler configs: the compatibility layer around `samplers`.

A diffusers pipeline folder stores its noise schedule and default sampler as
scheduler/scheduler_config.json, e.g. SD 1.5's PNDMScheduler with a scaled-linear schedule.
`get_sampler(name, **config)` builds a sdlearn sampler from such keys and refuses, with a
message, any option it does not implement at a value that would change the result;
`sampler_from_config(dict_or_path)` reads the file and picks the sampler its `_class_name`
names. A config for the other kind of model is refused too: flow_euler serves flow-matching
(velocity) models only, and the six alpha_bar samplers refuse a flow-matching config.
The algorithms themselves are in `sdlearn.diffusion.samplers`.
"""

import json
from pathlib import Path

from sdlearn.diffusion.samplers import FLOW_SAMPLER_NAMES, SAMPLER_NAMES, SAMPLERS, Sampler, config_keys

# Stable Diffusion 1.5's scheduler/scheduler_config.json: the training noise schedule, and
# PLMS as the default sampler. Used when a pipeline is built without a scheduler config.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# diffusers scheduler class -> sdlearn sampler name (a folder's scheduler is its default sampler)
SAMPLER_FOR_SCHEDULER = {cls.diffusers_class: name for name, cls in SAMPLERS.items()}
_HINTS = {
    "eta": "eta (DDIM's noise level) applies to the 'ddim' sampler only; 'ddpm' and 'euler_a' are the stochastic ones.",
    "skip_prk_steps": "sdlearn's PLMS always skips the Runge-Kutta warm-up, as Stable Diffusion's original sampler does.",
}


def _known_keys() -> set:
    """Every config key some sampler honours or recognises."""
    keys = set()
    for cls in SAMPLERS.values():
        keys |= set(config_keys(cls)) | set(cls.unsupported) | set(cls.inert)
    return keys


def _same(a, b) -> bool:
    try:
        return a == b or (a is None and b is None)
    except Exception:
        return False


# Keys that say "this model has an alpha_bar schedule" (refused by a flow sampler, as is an eps or v
# prediction_type), and the key that says "this is a flow-matching model" (refused by the six).
ALPHA_BAR_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")
FLOW_KEYS = ("shift",)
FLOW_PREDICTION = "flow_prediction"  # diffusers' prediction_type for a velocity model (UniPC, DPM-Solver with flow sigmas)


def _check_model_kind(cls, config: dict) -> None:
    """Refuse a config for the other kind of model: an eps/v model with a flow sampler, or the reverse.

    Either would run and draw noise: the sampler would read the model output as the wrong quantity.
    """
    if cls.is_flow:
        said = [f"{key}={config[key]!r}" for key in ALPHA_BAR_KEYS if config.get(key) is not None]
        if config.get("prediction_type", FLOW_PREDICTION) != FLOW_PREDICTION:
            said.insert(0, f"prediction_type={config['prediction_type']!r}")
        if said:
            raise ValueError(
                f"The {cls.name!r} sampler serves flow-matching models, which predict the velocity v = noise - x0; "
                f"this config ({said[0]}) is for a model trained on an alpha_bar schedule to predict eps or v. "
                f"Use one of {list(SAMPLER_NAMES)} for it, or a flow-matching model's config "
                f"({cls.diffusers_class}: num_train_timesteps, shift)."
            )
        return
    flow_classes = {SAMPLERS[name].diffusers_class for name in FLOW_SAMPLER_NAMES}
    said = [repr(config["_class_name"])] if config.get("_class_name") in flow_classes else []
    said += [f"{key}={config[key]!r}" for key in FLOW_KEYS if key in config]
    if said:
        raise ValueError(
            f"This scheduler config ({said[0]}) is for a flow-matching model, which predicts the velocity "
            f"v = noise - x0; the {cls.name!r} sampler reads eps or v on an alpha_bar schedule. Use {list(FLOW_SAMPLER_NAMES)}."
        )


def _check_config(cls, config: dict) -> dict:
    """Split a diffusers config into this sampler's arguments; refuse what would change behaviour."""
    _check_model_kind(cls, config)
    honoured = set(config_keys(cls))
    known = _known_keys()
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):  # bookkeeping: _class_name, _diffusers_version
            continue
        if key in honoured:
            kwargs[key] = value
        elif key in cls.unsupported:
            if not _same(value, cls.unsupported[key]):
                hint = _HINTS.get(key, f"sdlearn's {cls.name} sampler behaves as {key}={cls.unsupported[key]!r}.")
                raise ValueError(
                    f"The {cls.name!r} sampler does not implement {key}={value!r} (an option of diffusers' "
                    f"{cls.diffusers_class}). {hint} Remove the key or set it to {cls.unsupported[key]!r}."
                )
        elif key in cls.inert or key in known:
            continue  # an option this sampler does not use (diffusers ignores it too)
        else:
            raise ValueError(
                f"Unknown scheduler config key {key!r} for the {cls.name!r} sampler. "
                f"Keys it uses: {sorted(honoured)}. Is it misspelt?"
            )
    return kwargs


def get_sampler(name: str, **config) -> Sampler:
    """A sampler by name (ddpm, ddim, plms, euler, euler_a, dpmpp_2m; flow_euler) and diffusers config keys.

    With no config, the schedule is Stable Diffusion 1.5's (scaled_linear, 0.00085..0.012,
    1000 steps, steps_offset=1). `get_sampler("ddim", eta=0.5)` sets DDIM's eta.
    `get_sampler("flow_euler", shift=3.0)` is SD3's sampler for flow-matching (velocity) models.
    """
    if name not in SAMPLERS:
        raise ValueError(
            f"Unknown sampler {name!r}. Choose one of {list(SAMPLER_NAMES)} (models that predict eps or v), "
            f"or {list(FLOW_SAMPLER_NAMES)} (flow-matching models)."
        )
    cls = SAMPLERS[name]
    return cls(**_check_config(cls, config))


def sampler_from_config(config, name: str | None = None) -> Sampler:
    """A sampler from a diffusers scheduler config: a dict, a scheduler_config.json, or a
    folder holding one (a pipeline folder's `scheduler/` is found too).

    Without `name` the sampler matching `_class_name` is built (PNDMScheduler -> plms, ...);
    with it, the config's schedule is used by the named sampler (how diffusers swaps schedulers).
    """
    if not isinstance(config, dict):
        path = Path(config)
        for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text())
                break
        else:
            raise FileNotFoundError(
                f"No scheduler_config.json at {path}. Expected the file, a scheduler folder or a pipeline folder."
            )
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in SAMPLER_FOR_SCHEDULER:
            raise ValueError(
                f"The config is for {class_name!r}, which sdlearn does not implement. Pass name= one of "
                f"{list(SAMPLER_NAMES)} (or {list(FLOW_SAMPLER_NAMES)} for a flow-matching model) to use its schedule "
                "with another sampler."
            )
        name = SAMPLER_FOR_SCHEDULER[class_name]
    return get_sampler(name, **config)
