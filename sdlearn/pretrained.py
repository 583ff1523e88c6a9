"""Loading a whole Stable Diffusion model: `load_pipeline(source) -> StableDiffusion`.

Stable Diffusion weights come in three forms, and `load_pipeline` takes all of them:

1. A diffusers pipeline folder (what `StableDiffusionPipeline.save_pretrained` writes, and
   what a Stable Diffusion model repository holds): one folder per part plus an index,

       model_index.json              which class each part is, e.g. "unet": ["diffusers", "UNet2DConditionModel"]
       unet/ vae/ text_encoder/      config.json + safetensors weights
       tokenizer/                    vocab.json + merges.txt + special tokens
       scheduler/                    scheduler_config.json: the noise schedule the UNet was trained with

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

import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlearn.checkpoint import CheckpointError, check_state_dict
from sdlearn.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.pipeline import SD_SCHEDULER_CONFIG, StableDiffusion
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig

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
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "tokenizers" / "clip-vit-l14"
FAMILIES = ("sd1", "sd2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The files of a diffusers repository that load_pipeline reads (fetched from the hub).
HUB_FILES = ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors"]

# ------------------------------------------------------------------------------------------
# 1. The original (CompVis) layout: short rule tables, diffusers name -> CompVis name
# ------------------------------------------------------------------------------------------
# Each table rewrites one diffusers/transformers parameter name into the name the original
# code (CompVis' ldm, Stability's open_clip) gives the same tensor. Loading runs the same
# tables backwards: every parameter of the sdlearn model is looked up under its CompVis name.
# Names the tables leave alone (the inside of every SpatialTransformer, quant_conv, ...) are
# the same in both layouts.

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model.transformer.",
            "open_clip": "cond_stage_model.model."}

# Inside a UNet ResBlock (ldm's ResBlock: in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, dropout, conv])
UNET_RESNET_RULES = (
    (r"^norm1\.", "in_layers.0."),
    (r"^conv1\.", "in_layers.2."),
    (r"^time_emb_proj\.", "emb_layers.1."),
    (r"^norm2\.", "out_layers.0."),
    (r"^conv2\.", "out_layers.3."),
    (r"^conv_shortcut\.", "skip_connection."),
)
UNET_FIXED_RULES = (
    (r"^time_embedding\.linear_1\.", "time_embed.0."),  # time_embed = [Linear, SiLU, Linear]
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^conv_in\.", "input_blocks.0.0."),
    (r"^conv_norm_out\.", "out.0."),  # out = [GroupNorm, SiLU, conv]
    (r"^conv_out\.", "out.2."),
    (r"^mid_block\.resnets\.0\.", "middle_block.0."),  # middle_block = [ResBlock, SpatialTransformer, ResBlock]
    (r"^mid_block\.attentions\.0\.", "middle_block.1."),
    (r"^mid_block\.resnets\.1\.", "middle_block.2."),
)
# VAE (ldm's Encoder/Decoder). The decoder's levels are numbered the other way round in ldm
# (up.0 is the last, full-resolution level), hence the {rev} index.
VAE_RULES = (
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", "decoder.up.{rev}.block.\\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", "decoder.up.{rev}.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.to_(q|k|v)\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
)
# ldm's VAE attention uses 1x1 convolutions where diffusers uses linear layers: same numbers,
# weight (C, C, 1, 1) there and (C, C) here.
VAE_CONV_1X1 = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")
# SD 1.x: transformers' CLIPTextModel, stored whole under cond_stage_model.transformer.
# with the same names: no rules.
# SD 2.x: open_clip's text tower. Its attention holds q, k and v as one fused in_proj
# (3D, D) matrix; ours are three (D, D) ones, rows [0, D), [D, 2D), [2D, 3D) of it.
OPEN_CLIP_RULES = (
    (r"^text_model\.embeddings\.token_embedding\.weight$", "token_embedding.weight"),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\3"),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.", r"transformer.resblocks.\1.ln_\2."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
)
FUSED_PART = re.compile(r"self_attn\.(q|k|v)_proj\.")
# Tensors a CompVis file may hold for a part that sdlearn does not use (open_clip's
# projection to the joint image-text space and temperature; the 24th layer, which SD 2
# skips by conditioning on the penultimate one; old transformers' position ids).
IGNORED_KEYS = re.compile(r"^(text_projection|logit_scale|attn_mask|text_model\.embeddings\.position_ids|embeddings\.position_ids)$")


def _apply(rules, key: str, **values) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key.format(**values) if values else key


def _unet_block_prefix(key: str, config) -> tuple[str, str, bool]:
    """(CompVis block prefix, rest of the key, is it a ResBlock) for a down/up block parameter.

    ldm numbers the UNet's blocks in one flat list: input_blocks = [conv_in, then per level
    layers_per_block x (ResBlock [+ SpatialTransformer]) and a Downsample], output_blocks =
    per level (layers_per_block + 1) x (ResBlock [+ SpatialTransformer] [+ Upsample]).
    """
    layers = config.per_level("layers_per_block")
    m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)$", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        first = 1 + sum(n + 1 for n in layers[:level])  # input_blocks index of this level's first layer
        if kind == "downsamplers":  # Downsample(conv) -> input_blocks.i.0.op
            return f"input_blocks.{first + layers[level]}.0.", re.sub(r"^conv\.", "op.", rest), False
        return f"input_blocks.{first + j}.{0 if kind == 'resnets' else 1}.", rest, kind == "resnets"
    m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        up_layers = [n + 1 for n in layers[::-1]]
        first = sum(up_layers[:level])
        if kind == "upsamplers":  # after the ResBlock and, if the level has one, the SpatialTransformer
            has_attention = "CrossAttn" in config.up_block_types[level]
            return f"output_blocks.{first + up_layers[level] - 1}.{2 if has_attention else 1}.", rest, False
        return f"output_blocks.{first + j}.{0 if kind == 'resnets' else 1}.", rest, kind == "resnets"
    return "", key, False


def compvis_name(component: str, key: str, config) -> str:
    """The CompVis single-file name of one sdlearn/diffusers parameter (without the part's prefix)."""
    if component == "unet":
        prefix, rest, is_resnet = _unet_block_prefix(key, config)
        if prefix:
            return prefix + (_apply(UNET_RESNET_RULES, rest) if is_resnet else rest)
        m = re.match(r"^(mid_block\.resnets\.\d+\.)(.*)$", key)
        if m:
            return _apply(UNET_FIXED_RULES, m[1]) + _apply(UNET_RESNET_RULES, m[2])
        return _apply(UNET_FIXED_RULES, key)
    if component == "vae":
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.", key)
        rev = len(config.block_out_channels) - 1 - int(m[1]) if m else 0
        return _apply(VAE_RULES, key, rev=rev) if m else _apply(VAE_RULES, key)
    if component == "clip":
        return key
    if component == "open_clip":
        return _apply(OPEN_CLIP_RULES, key)
    raise ValueError(f"Unknown component {component!r}.")


def _components(text_layout: str) -> tuple:
    return (("unet", "unet"), ("vae", "vae"), ("text_encoder", text_layout))


def to_single_file_state_dict(pipeline: StableDiffusion, text_layout: str | None = None) -> dict:
    """The pipeline's weights in the CompVis single-file layout, as one flat dict of tensors."""
    text_layout = text_layout or ("open_clip" if pipeline.text_encoder.config.hidden_act == "gelu" else "clip")
    out = {}
    for attribute, component in _components(text_layout):
        model = getattr(pipeline, attribute)
        fused = {}  # open_clip: in_proj name -> [q, k, v]
        for key, value in model.state_dict().items():
            value = value.detach().to("cpu").contiguous()
            name = PREFIXES[component] + compvis_name(component, key, model.config)
            if component == "vae" and VAE_CONV_1X1.search(name):
                value = value[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
            part = FUSED_PART.search(key) if component == "open_clip" else None
            if part:
                fused.setdefault(name, [None] * 3)["qkv".index(part[1])] = value
            else:
                out[name] = value
        for name, (q, k, v) in fused.items():
            out[name] = torch.cat([q, k, v])  # (3D, D) or (3D,)
    return out


def from_single_file_state_dict(pipeline: StableDiffusion, state_dict: dict, source: str, text_layout: str,
                                dtype: torch.dtype = torch.float32) -> None:
    """Load CompVis-layout tensors into the pipeline's models (in place), checking every name and shape."""
    for attribute, component in _components(text_layout):
        model = getattr(pipeline, attribute)
        prefix = PREFIXES[component]
        theirs = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if component == "open_clip":  # SD 2 keeps open_clip's 24th layer, unused: drop the layers we do not have
            n = model.config.num_hidden_layers
            theirs = {k: v for k, v in theirs.items() if not (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)) or int(m[1]) < n}
        ours, used = {}, set()
        for key, target in model.state_dict().items():
            name = compvis_name(component, key, model.config)
            if name not in theirs:
                if component == "clip" and key.startswith("text_model.") and key[len("text_model."):] in theirs:
                    name = key[len("text_model."):]  # written by transformers < 4.x, without the text_model level
                else:
                    ours[key] = None  # reported below
                    continue
            value = theirs[name]
            used.add(name)
            part = FUSED_PART.search(key) if component == "open_clip" else None
            if part:  # rows [i D, (i+1) D) of the fused (3D, ...) in_proj
                width = value.shape[0] // 3
                i = "qkv".index(part[1])
                value = value[i * width:(i + 1) * width]
            if value.dim() == 4 and target.dim() == 2 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
            ours[key] = value
        target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [f"{k} {tuple(v.shape)} (expected {target_shapes[k]})" for k, v in ours.items()
                 if v is not None and v.numel() != math.prod(target_shapes[k])]
        if wrong:
            raise CheckpointError(
                f"{source}: {len(wrong)} {attribute} tensors have other sizes than the {attribute} built for them, e.g. "
                f"{wrong[:3]}. The model is not of the standard size; pass config= (a diffusers pipeline folder with its "
                "configs, or config dicts)."
            )
        missing = [f"{prefix}{compvis_name(component, k, model.config)}" for k, v in ours.items() if v is None]
        unexpected = [prefix + k for k in theirs if k not in used and not IGNORED_KEYS.match(k)]
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: the {attribute} weights do not match the model built for them. "
                f"Missing ({len(missing)}): {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected ({len(unexpected)}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                "If the model has non-standard sizes, pass config= (a diffusers pipeline folder or config dicts)."
            )
        check_state_dict(model, ours, source=f"{source} ({attribute})")
        # The models were built on the meta device (no memory, no random init): take the tensors as they are.
        model.load_state_dict({k: v.to(dtype).contiguous() for k, v in ours.items()}, strict=True, assign=True)


# ------------------------------------------------------------------------------------------
# 2. Reading a single file safely
# ------------------------------------------------------------------------------------------

PICKLE_RISK = (
    "A .ckpt file is a Python pickle, and unpickling can run any code its author put in it. sdlearn only loads "
    "pickles that hold plain tensors and containers (torch.load(weights_only=True)), and this one holds more. "
    "Do not load it unless you trust where it came from. Instead: use the model's .safetensors file or its diffusers "
    "folder if the publisher offers one, or convert it to .safetensors with a tool you trust, on a machine where "
    "running the file's code does no harm."
)


def read_single_file(path: Path) -> dict:
    """A flat {name: tensor} dict from a .safetensors file or a tensors-only pickled checkpoint."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if suffix in SAFETENSORS_SUFFIXES or (suffix not in PICKLE_SUFFIXES and len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        header_size = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not 0 < header_size < size - 8 or head[8:9] != b"{":
            raise CheckpointError(
                f"{path} is not a valid safetensors file: it should start with an 8-byte header size and a JSON header. "
                f"It is {size} bytes long and truncated or corrupted (or not a safetensors file at all). Download it again "
                "and compare its size and sha256 with the publisher's."
            )
        try:
            state_dict = load_file(path)
        except Exception as exc:  # safetensors raises SafetensorError / ValueError for bad headers and short files
            raise CheckpointError(
                f"{path} could not be read as safetensors ({exc}). The file is truncated or corrupted; download it again "
                "and compare its size and sha256 with the publisher's."
            ) from exc
    else:
        is_zip = zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6
        if not is_zip and head[:1] != b"\x80":  # nor a bare pickle (protocol 2+ starts with 0x80)
            raise CheckpointError(
                f"{path} is neither a safetensors file nor a PyTorch checkpoint (no zip archive, no pickle header). "
                "It may be truncated or corrupted; download it again."
            )
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            message = str(exc)
            if "Weights only load failed" in message or "Unsupported global" in message or "GLOBAL" in message:
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
                what = f" (it refers to {found[1]})" if found else ""
                raise CheckpointError(f"Refused to load {path}: it holds Python objects that are not tensors{what}. {PICKLE_RISK}") from None
            raise CheckpointError(
                f"{path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {message[:200]}). The file is "
                "truncated or corrupted; download it again."
            ) from exc
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]  # Lightning checkpoints: {"state_dict": ..., "global_step": ...}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors, so it is not a Stable Diffusion checkpoint.")
    return state_dict


# ------------------------------------------------------------------------------------------
# 3. Which model is it? Family, configs, tokenizer
# ------------------------------------------------------------------------------------------


def infer_family(state_dict: dict, source: str = "the checkpoint") -> str:
    """'sd1' (CLIP ViT-L/14 text encoder) or 'sd2' (open_clip ViT-H/14), read from the text encoder's keys."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(f"{source} looks like an SDXL checkpoint (conditioner.embedders.*); sdlearn implements SD 1.x and 2.x.")
    has_unet = any(k.startswith(PREFIXES["unet"]) for k in state_dict)
    clip = any(k.startswith(PREFIXES["clip"]) for k in state_dict)
    open_clip = any(k.startswith(PREFIXES["open_clip"]) for k in state_dict)
    if not has_unet or not (clip or open_clip) or not any(k.startswith(PREFIXES["vae"]) for k in state_dict):
        some = sorted(state_dict)[:3]
        raise CheckpointError(
            f"{source} is not a Stable Diffusion checkpoint in the CompVis layout: it needs model.diffusion_model.*, "
            f"first_stage_model.* and cond_stage_model.* tensors, and its keys begin like {some}. (A single UNet, VAE or "
            "LoRA file is not a whole model.)"
        )
    conv_in = state_dict.get(PREFIXES["unet"] + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise CheckpointError(
            f"{source} has a UNet with {conv_in.shape[1]} input channels (an inpainting or depth model); sdlearn implements "
            "the ordinary 4-channel UNet (its inpaint() works with that)."
        )
    return "sd2" if open_clip else "sd1"


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
                     prediction_type: str | None = None) -> StableDiffusion:
    """A StableDiffusion from one CompVis-layout checkpoint file (see the module docstring)."""
    state_dict = read_single_file(path)
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


def save_single_file(pipeline: StableDiffusion, path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline as one .safetensors file in the CompVis layout (what single-file tools open).

    The text encoder is written as SD 1.x's CLIP (quick_gelu) or SD 2.x's open_clip (gelu),
    so that loaders recognise the family. The noise schedule and sizes are not stored: a
    loader uses the family's standard ones, or a config it is given. dtype: e.g.
    torch.float16 to halve the file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"save_single_file writes safetensors; give a path ending in .safetensors, got {path.name!r}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Choose another path or pass overwrite=True.")
    state_dict = to_single_file_state_dict(pipeline)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path, metadata={"format": "pt", "written_by": "sdlearn"})
    return path


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


def load_scheduler_config(folder: Path) -> dict:
    """scheduler/scheduler_config.json of a pipeline folder, as a dict."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc


def load_folder(path: Path, device=None, dtype=None) -> StableDiffusion:
    read_model_index(path)
    unet = UNet.from_pretrained(path / "unet")
    vae = AutoencoderKL.from_pretrained(path / "vae")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
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
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"downloading it failed ({type(exc).__name__}: {exc})"
        raise ValueError(hub_offline_message(repo_id, reason)) from exc


# ------------------------------------------------------------------------------------------
# 5. One entry point
# ------------------------------------------------------------------------------------------

def _finish(pipeline: StableDiffusion, device=None, dtype=None) -> StableDiffusion:
    """Move to device/dtype; in half precision the autoencoder stays float32 (see StableDiffusion.to)."""
    return pipeline.to(device=device, dtype=dtype)


def load_pipeline(source, device=None, dtype: torch.dtype | None = None, *, config=None, family: str | None = None,
                  prediction_type: str | None = None, compile: bool = False) -> StableDiffusion:
    """A StableDiffusion pipeline from a diffusers folder, a single-file checkpoint or a hub id.

    device: e.g. "cpu" or "cuda" (default: CPU). dtype: e.g. torch.float16 on a GPU (default:
    float32 for single files, as stored for folders); the autoencoder stays float32 in half
    precision. For single files: family ("sd1" / "sd2") and prediction_type ("epsilon" /
    "v_prediction") override what is inferred (see the module docstring), config= gives the
    sizes of a non-standard model (a diffusers pipeline folder, or {"unet": {...}, "vae":
    {...}, "text_encoder": {...}, "scheduler": {...}, "tokenizer": folder}). compile=True
    compiles the UNet with torch.compile on a GPU (on the first generation).
    """
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a hub id (str or Path), got {type(source).__name__}.")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (or None to infer it), got {family!r}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or None), got {prediction_type!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}.")
    path = Path(source).expanduser()
    if path.is_file():
        pipeline = load_single_file(path, device, dtype, config=config, family=family, prediction_type=prediction_type)
    elif path.is_dir():
        if config is not None or family is not None or prediction_type is not None:
            raise ValueError("config=, family= and prediction_type= are for single-file checkpoints; a folder has its own configs.")
        pipeline = load_folder(path, device, dtype)
    elif isinstance(source, str) and HUB_ID.match(source) and not source.startswith((".", "~")):
        pipeline = load_folder(download_from_hub(source), device, dtype)
    else:
        raise ValueError(f"Nothing at {path}. {SUPPORTED}")
    if compile:
        compile_unet(pipeline)
    return pipeline


@dataclass
class LessonModel:
    """The model lesson 11 runs, and what to tell the learner about it."""

    pipe: StableDiffusion
    description: str  # which model ran, where, and why
    real: bool  # True: real Stable Diffusion weights; False: the course's mini-SD
    size: int  # the image side to generate at
    steps: int  # sampler steps that suit the model and the device


MODEL_ENV = "SDLEARN_SD_MODEL"  # a diffusers folder, a single file or a hub id of real SD weights


def lesson_pipeline(source=None, device=None, dtype: torch.dtype | None = None) -> LessonModel:
    """Real Stable Diffusion when weights are given (`source`, else $SDLEARN_SD_MODEL) and a GPU is there;
    otherwise the course's mini-SD (data/mini-sd) on the CPU. The description says which, and why.

    On a CPU real weights would cost about 12 s per guided step at 512x512; they are used there
    only when `device="cpu"` is asked for explicitly.
    """
    from sdlearn.datasets import data_path  # imported here: only the lesson's fallback needs it

    source = source if source is not None else os.environ.get(MODEL_ENV) or None
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
    device = torch.device(device) if device is not None else None
    if source is not None and (gpu is not None or (device is not None and device.type == "cpu")):
        target = device or torch.device(gpu)
        half = dtype or (torch.float16 if target.type != "cpu" else torch.float32)
        pipe = load_pipeline(source, device=target, dtype=half)
        size = pipe.default_size
        return LessonModel(pipe, f"real Stable Diffusion from {source} on {target.type} ({str(half).replace('torch.', '')}), "
                                 f"{size}x{size}", True, size, 30)
    if source is not None:
        why = f"{MODEL_ENV} / source is {source!r}, but there is no GPU; real weights on this CPU would take minutes per image"
    else:
        why = f"no real weights given (set {MODEL_ENV} to a Stable Diffusion folder, single file or hub id)"
    pipe = load_pipeline(data_path("mini-sd", "train-mini-sd"))
    return LessonModel(pipe, f"the course's mini-SD (data/mini-sd) on the CPU: {why}", False, pipe.default_size, 25)


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


__all__ = ["load_pipeline", "lesson_pipeline", "LessonModel", "load_single_file", "save_single_file", "read_single_file", "infer_family", "read_model_index",
           "to_single_file_state_dict", "compvis_name"]
