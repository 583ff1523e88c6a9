"""Loading a whole Stable Diffusion model: `load_pipeline(source) -> StableDiffusion`.

Stable Diffusion weights come in three forms, and `load_pipeline` takes all of them:

1. A diffusers pipeline folder (what `StableDiffusionPipeline.save_pretrained` writes, and
   what a Stable Diffusion model repository holds): one folder per part plus an index,

       model_index.json              which class each part is, e.g. "unet": ["diffusers", "UNet2DConditionModel"]
       unet/ vae/ text_encoder/      config.json + safetensors weights
       tokenizer/                    vocab.json + merges.txt + special tokens
       scheduler/                    scheduler_config.json: the noise schedule the UNet was trained with

   An SDXL folder (model_index.json names StableDiffusionXLPipeline; text_encoder_2/ and
   tokenizer_2/ besides) loads as a StableDiffusionXL (sdlearn.pipeline.stable_diffusion_xl).

2. A single file in the original CompVis layout (`.safetensors`, or a pickled `.ckpt`):
   one flat dict of tensors, the parts told apart by prefixes,

       model.diffusion_model.*        the UNet (ldm's names: input_blocks.N, middle_block, output_blocks.N)
       first_stage_model.*            the autoencoder (ldm's names: encoder.down.N.block.M, mid.attn_1, ...)
       cond_stage_model.transformer.* SD 1.x: transformers' CLIPTextModel (ViT-L/14), names as here
       cond_stage_model.model.*       SD 2.x: open_clip's text tower (ViT-H/14), q, k, v fused as in_proj

   The file holds no configuration. The family is read from the tensors: SD 1.x has a
   cond_stage_model.transformer, SD 2.x a cond_stage_model.model. Whether the UNet predicts
   eps or v cannot be read from the tensors at all, so this rule of thumb decides unless
   `prediction_type=` says otherwise:

       SD 1.x                         -> epsilon, 512 px (runwayml/stable-diffusion-v1-5)
       SD 2.x                         -> v_prediction, 768 px (stabilityai/stable-diffusion-2-1)
       SD 2.x, prediction_type="epsilon" -> the 512 px "base" model (stable-diffusion-2-1-base)

   The sizes come from sdlearn's presets (UNetConfig.sd15 / sd2, VAEConfig.sd,
   CLIPTextConfig.vit_l14 / vit_h14); for other sizes pass `config=`, a diffusers pipeline
   folder or a dict of config dicts. Names are converted by short rule tables (section 1),
   plus two reshapes: the autoencoder's attention is a 1x1 convolution in ldm and a linear
   layer here, and open_clip fuses q, k, v into one (3D, D) in_proj matrix.
   `save_single_file(pipeline, path)` applies the same tables the other way.

   Safety: a `.ckpt` is a pickle, and unpickling can run arbitrary code. Only
   `torch.load(weights_only=True)` is used, which accepts tensors and plain containers and
   refuses everything else before running it.

3. A Hugging Face hub id ("stabilityai/stable-diffusion-2-1"): downloaded with
   huggingface_hub.snapshot_download into its cache, then loaded as a folder.

Memory and speed options for GPUs: `dtype=torch.float16` (or bfloat16) runs the UNet and
the text encoder in half precision while the autoencoder stays in float32 (SD's VAE
overflows in fp16 and gives black or NaN images), `compile=True` compiles the UNet with
torch.compile (skipped on a CPU), and `StableDiffusion.enable_slicing()` trades speed for
memory.

References: CompVis/stable-diffusion ldm/modules/diffusionmodules/openaimodel.py and
model.py (the original names); diffusers' loaders/single_file_utils.py (the same
conversion as a long literal map); open_clip's transformer.py (the fused in_proj).
"""

import difflib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from sdlearn.diffusion.schedules import PREDICTION_TYPES
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.pipeline.stable_diffusion import SD_SCHEDULER_CONFIG, StableDiffusion
from sdlearn.pipeline.stable_diffusion_xl import PIPELINE_CLASS as SDXL_PIPELINE_CLASS, StableDiffusionXL
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.models.vae import AutoencoderKL, VAEConfig
from sdlearn.pipeline.single_file import (FAMILIES, from_single_file_state_dict, infer_family, read_single_file, save_single_file, to_single_file_state_dict)

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")

# part -> the library classes model_index.json may name for it (sdlearn's class loads each)
PARTS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}

SUPPORTED = (
    "sdlearn loads diffusers-format pipeline folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
    "single-file checkpoints in the original CompVis layout (.safetensors, or tensors-only .ckpt) and Hugging Face hub ids."
)
SD_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizers" / "clip-vit-l14"
# The files of a diffusers repository that load_pipeline reads (fetched from the hub).
HUB_FILES = ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors"]

# ------------------------------------------------------------------------------------------
# 3. Which model is it? Family, configs, tokenizer
# ------------------------------------------------------------------------------------------


def preset_configs(family: str, prediction_type: str) -> dict:
    """sdlearn's presets for a family: {"unet", "vae", "text_encoder", "scheduler"} config dicts."""
    if family == "sd1":
        unet, text = UNetConfig.sd15(), CLIPTextConfig.vit_l14()
    elif prediction_type == "v_prediction":  # SD 2.x 768-v
        unet, text = UNetConfig.sd2(), CLIPTextConfig.vit_h14()
    else:  # SD 2.x 512 base
        unet, text = UNetConfig.sd2(sample_size=64, upcast_attention=False), CLIPTextConfig.vit_h14()
    scheduler = dict(SD_SCHEDULER_CONFIG) if family == "sd1" else {
        **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"}, "_class_name": "DDIMScheduler",
    }  # SD 2's repositories ship DDIM on the same noise schedule
    scheduler["prediction_type"] = prediction_type
    return {"unet": unet.to_dict(), "vae": VAEConfig.sd().to_dict(), "text_encoder": text.to_dict(), "scheduler": scheduler}


def sd_tokenizer(family: str, folder=None) -> CLIPTokenizer:
    """CLIP's BPE tokenizer; SD 2.x's copy pads with "!" (id 0) instead of the end token."""
    folder = Path(folder) if folder is not None else SD_TOKENIZER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No tokenizer folder at {folder} (vocab.json and merges.txt, or tokenizer.json). sdlearn ships CLIP's vocabulary in data/tokenizers/clip-vit-l14 "
            "of its repository; run from a checkout, or pass config= a diffusers folder that has a tokenizer/."
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if family == "sd2" and folder == SD_TOKENIZER:
        tokenizer = CLIPTokenizer(tokenizer.encoder, tokenizer.merges, pad_token="!")
    return tokenizer


def _configs_from(config, family: str, prediction_type: str) -> tuple[dict, Path | None]:
    """The config dicts to build (presets, overridden by `config`) and a tokenizer folder, if any."""
    configs = preset_configs(family, prediction_type)
    if config is None:
        return configs, None
    if isinstance(config, (str, Path)):
        folder = Path(config)
        read_model_index(folder)
        for part in ("unet", "vae", "text_encoder"):
            configs[part] = json.loads((folder / part / "config.json").read_text())
        configs["scheduler"] = load_scheduler_config(folder)
        return configs, folder / "tokenizer"
    if isinstance(config, dict):
        unknown = set(config) - {"unet", "vae", "text_encoder", "scheduler", "tokenizer"}
        if unknown:
            raise ValueError(f"config= has unknown parts {sorted(unknown)}; use unet, vae, text_encoder, scheduler (dicts) and tokenizer (a folder).")
        configs.update({k: v for k, v in config.items() if k != "tokenizer"})
        return configs, Path(config["tokenizer"]) if config.get("tokenizer") else None
    raise TypeError(f"config= must be a diffusers pipeline folder or a dict of config dicts, got {type(config).__name__}.")


def load_single_file(path: Path, device=None, dtype=None, config=None, family: str | None = None,
                     prediction_type: str | None = None, check_finite: bool = True) -> StableDiffusion:
    """A StableDiffusion from one CompVis-layout checkpoint file (see the module docstring)."""
    state_dict = read_single_file(path, check_finite=check_finite)
    found = infer_family(state_dict, str(path))
    if family is not None and family != found:
        raise CheckpointError(f"family={family!r} was asked, but {path} holds an {found} text encoder.")
    # The rule of thumb: SD 2.x files are most often the 768 px v-prediction models. A config= says it itself.
    guessed = prediction_type or ("v_prediction" if found == "sd2" else "epsilon")
    configs, tokenizer_folder = _configs_from(config, found, guessed)
    if prediction_type is not None:  # asked explicitly: overrides config= too
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
    with torch.device("meta"):  # no memory and no random init: every tensor comes from the file
        pipeline = StableDiffusion(
            UNet.from_config(configs["unet"]), AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel.from_config(configs["text_encoder"]), sd_tokenizer(found, tokenizer_folder), configs["scheduler"],
        )
    text_layout = "open_clip" if found == "sd2" else "clip"
    from_single_file_state_dict(pipeline, state_dict, str(path), text_layout, dtype=torch.float32)
    return _finish(pipeline, device, dtype)


# ------------------------------------------------------------------------------------------
# 4. Diffusers folders and hub ids
# ------------------------------------------------------------------------------------------


def read_model_index(folder: Path) -> dict:
    """model_index.json of a pipeline folder, checked to describe a Stable Diffusion 1.x/2.x pipeline."""
    path = folder / "model_index.json"
    if not path.is_file():
        hint = ""
        if (folder / "config.json").is_file():
            hint = " It holds a config.json: it looks like the folder of one model (a UNet, VAE or text encoder), not a whole pipeline."
        elif (folder / "unet").is_dir():
            hint = " It has a unet/ folder but no index; was the copy incomplete?"
        raise ValueError(f"{folder} is not a pipeline folder: it has no model_index.json.{hint} {SUPPORTED}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES:
        raise ValueError(
            f"{folder} holds a {pipeline_class}, but sdlearn implements Stable Diffusion 1.x/2.x pipelines {list(PIPELINE_CLASSES)}."
        )
    for part, library_classes in PARTS.items():
        entry = index.get(part)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ValueError(f"{path} lists no {part}; a Stable Diffusion pipeline needs unet, vae, text_encoder, tokenizer and scheduler.")
        if entry[1] not in library_classes:
            raise ValueError(f"{path} says the {part} is a {entry[1]}; sdlearn supports {list(library_classes)} there.")
        if not (folder / part).is_dir():
            raise ValueError(f"{folder} has no {part}/ folder although model_index.json lists one; was the copy incomplete?")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"{folder} has no scheduler/scheduler_config.json (the noise schedule the model was trained with).")
    return index


def _names_sdxl(folder: Path) -> bool:
    """Whether model_index.json names a StableDiffusionXLPipeline (anything unreadable: False, read_model_index says why)."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == SDXL_PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def load_scheduler_config(folder: Path) -> dict:
    """scheduler/scheduler_config.json of a pipeline folder, as a dict."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc


def load_folder(path: Path, device=None, dtype=None, check_finite: bool = True) -> StableDiffusion:
    if _names_sdxl(path):  # two text encoders: its own loader
        return StableDiffusionXL.from_pretrained(path, device, dtype, check_finite=check_finite)
    read_model_index(path)
    unet = UNet.from_pretrained(path / "unet", check_finite=check_finite)
    vae = AutoencoderKL.from_pretrained(path / "vae", check_finite=check_finite)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", check_finite=check_finite)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    return _finish(StableDiffusion(unet, vae, text_encoder, tokenizer, load_scheduler_config(path)), device, dtype)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline_message(repo_id: str, reason: str) -> str:
    return (
        f"{repo_id!r} is not a local file or folder, so it was taken for a Hugging Face hub id, but {reason}. "
        f"Download the repository on a machine with internet access, e.g. `huggingface-cli download {repo_id}` "
        f"(or `git clone https://huggingface.co/{repo_id}`), then pass its folder to load_pipeline; "
        "or unset HF_HUB_OFFLINE to let sdlearn download it."
    )


def download_from_hub(repo_id: str) -> Path:
    """The local folder of a diffusers repository on the hub (downloaded into huggingface_hub's cache)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        # Offline, only the local cache is looked at: this never touches the network.
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as exc:  # no connection, unknown repository, gated model, not in the cache ...
        first_line = (str(exc).strip().splitlines() or [""])[0]  # huggingface_hub's messages run over several lines
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"downloading it failed ({type(exc).__name__}: {first_line})"
        raise ValueError(hub_offline_message(repo_id, reason)) from exc


# ------------------------------------------------------------------------------------------
# 5. One entry point
# ------------------------------------------------------------------------------------------


def check_device(device) -> torch.device | None:
    """`device` as a torch.device that can run a model here, or a ValueError that says what to use.

    Refused: names torch does not know, "meta" (tensors without data: nothing can be computed
    on it) and accelerators this torch cannot see (e.g. cuda on a machine without a GPU).
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc}). Use \"cpu\" or \"cuda\".") from None
    if device.type == "meta":
        raise ValueError('device "meta" holds no data, so no image can be computed on it. Use "cpu" or "cuda".')
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError('device "cuda", but this torch sees no CUDA GPU. Use "cpu" (see README.md, "Using a GPU").')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError('device "mps", but this torch sees no Apple GPU. Use "cpu".')
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
            raise ValueError(f"device {str(device)!r} is not available to this torch. Use \"cpu\" or \"cuda\".")
    return device


def missing_path_message(source: str, path: Path) -> str:
    """'Nothing at ...: no such file or folder', with the nearest names in its folder when one is close."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    near = []
    if parent.is_dir():
        try:
            names = [entry.name for entry in parent.iterdir() if not entry.name.startswith(".")]
        except OSError:
            names = []
        wanted = path.relative_to(parent).parts[0] if path != parent else path.name
        near = [str(parent / name) for name in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6)]
    hint = f" Did you mean {' or '.join(near)}?" if near else ""
    return f"Nothing at {source}: no such file or folder.{hint} {SUPPORTED}"


def looks_local(source: str) -> bool:
    """Whether `source` names a local path rather than a hub id ("owner/name").

    A hub id has exactly one "/" and no file suffix; a name whose first part is a folder
    here (data/mini-sdd, where data/ exists) or that starts with ".", "~" or "/" is a path.
    """
    if not HUB_ID.match(source) or source.startswith((".", "~", "/")):
        return True
    first = source.split("/", 1)[0]
    return Path(first).is_dir() or Path(source).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")

def _finish(pipeline: StableDiffusion, device=None, dtype=None) -> StableDiffusion:
    """Move to device/dtype; in half precision the autoencoder stays float32 (see StableDiffusion.to)."""
    return pipeline.to(device=device, dtype=dtype)


def load_pipeline(source, device=None, dtype: torch.dtype | None = None, *, config=None, family: str | None = None,
                  prediction_type: str | None = None, compile: bool = False, check_finite: bool = True) -> StableDiffusion:
    """A StableDiffusion pipeline from a diffusers folder, a single-file checkpoint or a hub id.

    device: e.g. "cpu" or "cuda" (default: CPU). dtype: e.g. torch.float16 on a GPU (default:
    float32 for single files, as stored for folders); the autoencoder stays float32 in half
    precision. For single files: family ("sd1" / "sd2") and prediction_type ("epsilon" /
    "v_prediction") override what is inferred (see the module docstring), config= gives the
    sizes of a non-standard model (a diffusers pipeline folder, or {"unet": {...}, "vae":
    {...}, "text_encoder": {...}, "scheduler": {...}, "tokenizer": folder}). compile=True
    compiles the UNet with torch.compile on a GPU (on the first generation). check_finite=False
    loads weights that hold NaN or infinity (refused by default: such a file draws nothing).
    """
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a hub id (str or Path), got {type(source).__name__}.")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (or None to infer it), got {family!r}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or None), got {prediction_type!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}.")
    device = check_device(device)
    path = Path(source).expanduser()
    if path.is_file():
        pipeline = load_single_file(path, device, dtype, config=config, family=family, prediction_type=prediction_type,
                                    check_finite=check_finite)
    elif path.is_dir():
        if config is not None or family is not None or prediction_type is not None:
            raise ValueError("config=, family= and prediction_type= are for single-file checkpoints; a folder has its own configs.")
        pipeline = load_folder(path, device, dtype, check_finite=check_finite)
    elif isinstance(source, str) and not looks_local(source):
        pipeline = load_folder(download_from_hub(source), device, dtype, check_finite=check_finite)
    else:
        raise ValueError(missing_path_message(str(source), path))
    if compile:
        compile_unet(pipeline)
    return pipeline


def compile_unet(pipeline: StableDiffusion) -> bool:
    """Compile the UNet with torch.compile (in place, on its first call). Skipped on a CPU: returns False."""
    if pipeline.device.type == "cpu":
        warnings.warn(
            "compile=True was ignored: compiling the UNet takes minutes on a CPU and gains little there. "
            "It is meant for GPUs.", stacklevel=3,
        )
        return False
    pipeline.unet.compile()  # nn.Module.compile: the module keeps its class, attributes and state dict names
    return True


__all__ = ["load_pipeline", "load_single_file", "save_single_file", "read_single_file", "infer_family", "read_model_index",
           "to_single_file_state_dict"]
