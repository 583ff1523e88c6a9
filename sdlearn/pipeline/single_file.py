"""Single-file checkpoints: Stable Diffusion in the original CompVis layout, one flat dict of tensors.

    model.diffusion_model.*        the UNet (ldm's names: input_blocks.N, middle_block, output_blocks.N)
    first_stage_model.*            the autoencoder (ldm's names: encoder.down.N.block.M, mid.attn_1, ...)
    cond_stage_model.transformer.* SD 1.x: transformers' CLIPTextModel (ViT-L/14), names as here
    cond_stage_model.model.*       SD 2.x: open_clip's text tower (ViT-H/14), q, k, v fused as in_proj

Names are converted by short rule tables (section 1), plus two reshapes: the autoencoder's
attention is a 1x1 convolution in ldm and a linear layer here, and open_clip fuses q, k, v
into one (3D, D) in_proj matrix. `save_single_file` applies the tables one way and
`from_single_file_state_dict` the other; `read_single_file` opens a file safely (section 2).
`sdlearn.pipeline.loading` builds a whole pipeline from such a file.

Works on any object with `unet`, `vae` and `text_encoder` attributes (a StableDiffusion).

References: CompVis/stable-diffusion ldm/modules/diffusionmodules/openaimodel.py and
model.py (the original names); diffusers' loaders/single_file_utils.py (the same
conversion as a long literal map); open_clip's transformer.py (the fused in_proj).
"""

import math
import re
import zipfile
from pathlib import Path

import torch

from sdlearn.models.checkpoint import CheckpointError, check_state_dict, refuse_non_finite
from sdlearn.models.files import write_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FAMILIES = ("sd1", "sd2")

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


def to_single_file_state_dict(pipeline, text_layout: str | None = None) -> dict:
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


def from_single_file_state_dict(pipeline, state_dict: dict, source: str, text_layout: str,
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


def read_single_file(path: Path, check_finite: bool = True) -> dict:
    """A flat {name: tensor} dict from a .safetensors file or a tensors-only pickled checkpoint.

    check_finite: refuse a file whose tensors hold NaN or infinity, naming the tensor
    (sdlearn.models.checkpoint.refuse_non_finite says why this is the default).
    """
    path = Path(path)
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
    if check_finite:
        refuse_non_finite(state_dict, str(path))
    return state_dict




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


SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what single-file loaders read as weights


def save_single_file(pipeline, path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline as one .safetensors file in the CompVis layout (what single-file tools open).

    The text encoder is written as SD 1.x's CLIP (quick_gelu) or SD 2.x's open_clip (gelu),
    so that loaders recognise the family. The noise schedule and sizes are not stored: a
    loader uses the family's standard ones, or a config it is given. dtype: e.g.
    torch.float16 to halve the file (a floating dtype: an integer one would round every
    weight to a whole number, a model that draws grey).
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise TypeError(
            f"save_single_file(dtype=...) must be one of {[str(d) for d in SAVE_DTYPES]} (or None: as the model is), "
            f"got {dtype!r}: weights cast to it would be rounded into a model that draws nothing."
        )
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"save_single_file writes safetensors; give a path ending in .safetensors, got {path.name!r}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Choose another path or pass overwrite=True.")
    state_dict = to_single_file_state_dict(pipeline)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    # written to a temporary sibling and renamed into place: a failed or killed save keeps the old file
    return write_file(path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt", "written_by": "sdlearn"}))
