"""LoRA: personalising a frozen UNet with a low-rank update (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", eq. 3).

Notation (used everywhere below):
    W      (out, in)   a frozen weight of a linear layer (here the attention projections
                       to_q, to_k, to_v, to_out.0 of the UNet's transformer blocks)
    A      (r, in)     the "down" matrix, initialised Kaiming-uniform (a = sqrt(5)), as peft does
    B      (out, r)    the "up" matrix, initialised to zero
    r                  the rank, r << min(out, in)
    alpha              a constant; alpha / r keeps the update's size steady when r changes
    s                  a runtime scale: diffusers' `cross_attention_kwargs={"scale": s}`, or the
                       weight given to `set_adapters`; 0 switches the LoRA off

The LoRA forward pass (eq. 3 with the alpha / r scaling of section 4.1):

    y = W x + b + (alpha / r) * s * B (A x)

Because B = 0 at the start, y = W x + b exactly: training starts from the base model and only
A and B (r * (in + out) numbers per layer instead of out * in) are trained. Merging folds the
update into the weight so inference costs nothing extra, and unmerging takes it back out:

    merge:    W <- W + (alpha / r) * s * B A
    unmerge:  W <- W - (alpha / r) * s * B A

Files (safetensors only, never pickle):

- diffusers (what `StableDiffusionPipeline.save_lora_weights` writes and `load_lora_weights`
  reads): `pytorch_lora_weights.safetensors` with keys `unet.<module path>.lora_A.weight` (A)
  and `unet.<module path>.lora_B.weight` (B); r and alpha go in the safetensors metadata under
  `lora_adapter_metadata`, a JSON dict of peft `LoraConfig` fields prefixed `unet.` (`unet.r`,
  `unet.lora_alpha`, `unet.target_modules`). Without that metadata diffusers takes alpha = r.
  The older diffusers keys `unet.<path>.lora.down.weight` / `lora.up.weight` (what diffusers'
  `convert_state_dict_to_diffusers` makes of a peft state dict) are read too.
- kohya (sd-scripts, the format of most community LoRAs): keys
  `lora_unet_<module path with "." -> "_">.lora_down.weight` (A), `.lora_up.weight` (B) and
  `.alpha` (a 0-d tensor), e.g. `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`.
  The underscores are mapped back to module paths by a table built from the UNet's own
  module names, so no name has to be guessed.

References: peft `tuners/lora/layer.py` (Linear, reset_lora_parameters, merge), diffusers
`loaders/lora_pipeline.py` (save_lora_weights, load_lora_weights), `utils/peft_utils.py`,
`loaders/lora_conversion_utils.py` (kohya -> diffusers).
"""

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdlearn.models.files import write_file  # atomic: a failed save keeps an older file whole

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"


class LoRAError(ValueError):
    """A LoRA file or call does not fit the UNet it is used with."""


# 1. The layer ------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update: y = W x + b + (alpha / r) * s * B (A x).

    `weight` and `bias` are the very Parameters of the wrapped nn.Linear (shared, not copied), so
    the UNet's own parameter names (`...to_q.weight`) do not change; `lora_A` (r, in) and
    `lora_B` (out, r) are the only trainable parameters.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise LoRAError(f"LoRA wraps nn.Linear layers, but got {type(linear).__name__}; target only linear projections.")
        if not (isinstance(rank, int) and rank >= 1):
            raise LoRAError(f"The LoRA rank must be a positive integer, but got {rank!r}; use e.g. rank=4.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # W (out, in), frozen
        self.bias = linear.bias  # b (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0  # s, the runtime scale
        self.merged_scale = None  # the (alpha / r) * s folded into W by merge(), None when unmerged
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # A (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # B (out, r) = 0
        # peft's init_lora_weights=True: A ~ Kaiming-uniform(a = sqrt(5)) (nn.Linear's own init), B = 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        """(alpha / r) * s, the factor in front of B A."""
        return self.alpha / self.rank * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * s * B A, shape (out, in): the update merge() adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # W x + b
        if self.merged_scale is not None or self.scale == 0:
            return y  # merged: the update is already inside W
        # + (alpha / r) * s * B (A x), computed as two thin products (never the (out, in) matrix)
        return y + self.scaling * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) * s * B A."""
        if self.merged_scale is None:
            self.weight += self.delta_weight()
            self.merged_scale = self.scaling

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) * s * B A, with the s that was merged."""
        if self.merged_scale is not None:
            self.weight -= self.merged_scale * (self.lora_B @ self.lora_A)
            self.merged_scale = None

    def to_linear(self) -> nn.Linear:
        """The plain nn.Linear again, holding the same W and b Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


# 2. Adding, scaling, merging, removing -----------------------------------------------------


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of a model, keyed by module path (e.g. `mid_block.attentions.0.transformer_blocks.0.attn1.to_q`)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def _targeted(unet: nn.Module, targets) -> list[str]:
    """Module paths of the nn.Linear layers whose path ends with one of `targets` (peft's rule)."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None, targets=TARGETS) -> list[nn.Parameter]:
    """Wrap the target linear layers in LoRALinear, freeze everything else, return the LoRA parameters.

    alpha defaults to rank (so alpha / r = 1, diffusers' default). Returns [A, B, A, B, ...] in
    module order: give exactly these to the optimiser.
    """
    if lora_layers(unet):
        raise LoRAError("This UNet already has LoRA layers; call remove_lora(unet) first or keep training the ones it has.")
    paths = _targeted(unet, targets)
    if not paths:
        raise LoRAError(f"No linear layer of this model is named like {tuple(targets)}; "
                        f"pass targets that exist, e.g. {TARGETS}.")
    unet.requires_grad_(False)
    params = []
    for path in paths:
        layer = LoRALinear(unet.get_submodule(path), rank, alpha)
        _set_module(unet, path, layer)
        params += [layer.lora_A, layer.lora_B]
    return params


def _layers_or_error(unet: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(unet)
    if not layers:
        raise LoRAError("This UNet has no LoRA layers; call add_lora(unet) or load_lora(unet, path) first.")
    return layers


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Set the runtime scale s of every LoRA layer (0 = base model, 1 = the LoRA as trained)."""
    for layer in _layers_or_error(unet).values():
        if layer.merged_scale is not None:
            raise LoRAError("The LoRA is merged into the weights; call unmerge_lora(unet) before changing its scale.")
        layer.scale = float(scale)


def merge_lora(unet: nn.Module) -> None:
    """W <- W + (alpha / r) * s * B A in every LoRA layer (the forward pass then skips B A)."""
    for layer in _layers_or_error(unet).values():
        layer.merge()


def unmerge_lora(unet: nn.Module) -> None:
    """W <- W - (alpha / r) * s * B A in every merged LoRA layer: the original weights again."""
    for layer in _layers_or_error(unet).values():
        layer.unmerge()


def remove_lora(unet: nn.Module, merge: bool = False) -> None:
    """Put the plain nn.Linear layers back (merging the update into W first if merge=True).

    The base weights stay frozen (requires_grad=False) as add_lora left them; call
    unet.requires_grad_(True) to train the whole UNet again.
    """
    for path, layer in _layers_or_error(unet).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(unet, path, layer.to_linear())


# 3. Files ----------------------------------------------------------------------------------


def _check_finite(state: dict[str, torch.Tensor], path) -> None:
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise LoRAError(f"{key} in {path} holds NaN or infinite values; the LoRA is broken, retrain it or use another file.")


def save_lora(unet: nn.Module, folder, format: str = "diffusers", weight_name: str = WEIGHT_NAME,
              overwrite: bool = False) -> Path:
    """Write the LoRA layers of `unet` to folder/weight_name in diffusers' or kohya's format.

    The file is written atomically (a failed save keeps an older file whole), and an existing
    file is refused unless overwrite=True.

    diffusers: `unet.<path>.lora_A.weight`, `unet.<path>.lora_B.weight`; r and alpha in the
    `lora_adapter_metadata` JSON (peft LoraConfig fields, prefixed `unet.`).
    kohya: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    """
    layers = _layers_or_error(unet)
    state, metadata = {}, {"format": "pt"}
    if format == "diffusers":
        for path, layer in layers.items():
            state[f"{DIFFUSERS_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach().contiguous()
            state[f"{DIFFUSERS_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach().contiguous()
        # The most common rank and alpha go in r / lora_alpha, the others in peft's patterns.
        r = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
        alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {p: m.rank for p, m in layers.items() if m.rank != r},
            "alpha_pattern": {p: m.alpha for p, m in layers.items() if m.alpha != alpha},
            "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
        }
        metadata[METADATA_KEY] = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()}, indent=2, sort_keys=True)
    elif format == "kohya":
        for path, layer in layers.items():
            name = KOHYA_PREFIX + path.replace(".", "_")
            state[f"{name}.lora_down.weight"] = layer.lora_A.detach().contiguous()
            state[f"{name}.lora_up.weight"] = layer.lora_B.detach().contiguous()
            state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=layer.lora_A.dtype)
        metadata["ss_network_module"] = "networks.lora"
    else:
        raise LoRAError(f"Unknown LoRA file format {format!r}; use 'diffusers' or 'kohya'.")
    folder = Path(folder)
    path = folder / weight_name
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise LoRAError(f"There is no LoRA file at {path}; pass a .safetensors file or a folder holding {WEIGHT_NAME}.")
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path} is not a .safetensors file; LoRAs are read from safetensors only (no pickle), "
                        "convert it with safetensors first.")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _parse_diffusers(state, metadata, path) -> dict[str, dict]:
    """{module path: {"A", "B", "alpha"}} from diffusers' keys (peft lora_A/B or the older lora.down/up)."""
    config = {}
    if METADATA_KEY in metadata:
        packed = json.loads(metadata[METADATA_KEY])
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
    parts = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B"}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(DIFFUSERS_PREFIX) or suffix is None:
            raise LoRAError(f"Unexpected key {key!r} in {path}: expected only unet.<module>.lora_A.weight / "
                            ".lora_B.weight keys; remove the others (text-encoder LoRAs are not supported).")
        parts.setdefault(key[len(DIFFUSERS_PREFIX):-len(suffix)], {})[suffixes[suffix]] = tensor
    for module, part in parts.items():
        rank = part["A"].shape[0] if "A" in part else 1
        if "lora_alpha" in config:
            part["alpha"] = float((config.get("alpha_pattern") or {}).get(module, config["lora_alpha"]))
        else:
            part["alpha"] = float(rank)  # no metadata: diffusers takes alpha = r
    return parts


def _parse_kohya(state, path, kohya_names) -> dict[str, dict]:
    suffixes = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
    parts = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(KOHYA_PREFIX) or suffix is None:
            raise LoRAError(f"Unexpected key {key!r} in {path}: expected only lora_unet_<module>.lora_down.weight / "
                            ".lora_up.weight / .alpha keys; remove the others (text-encoder LoRAs are not supported).")
        name = key[:-len(suffix)]
        if name not in kohya_names:
            raise LoRAError(f"{key!r} in {path} names a module this UNet lacks ({name}); "
                            "use a LoRA trained for this UNet's architecture.")
        parts.setdefault(kohya_names[name], {})[suffixes[suffix]] = tensor
    for part in parts.values():
        part["alpha"] = float(part["alpha"]) if "alpha" in part else float(part["A"].shape[0] if "A" in part else 1)
    return parts


def load_lora(unet: nn.Module, path, scale: float = 1.0) -> list[nn.Parameter]:
    """Read a LoRA file (diffusers or kohya format, detected from its keys) into `unet`.

    A UNet without LoRA layers gets them (with the file's ranks); one that has them must match
    the file's ranks and modules. Returns the LoRA parameters, as add_lora does.
    """
    state, metadata = _read(path)
    if not state:
        raise LoRAError(f"{path} holds no tensors; expected LoRA keys like unet.<module>.lora_A.weight or "
                        "lora_unet_<module>.lora_down.weight, check that this is a LoRA file.")
    _check_finite(state, path)
    linear_paths = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    if any(k.startswith(KOHYA_PREFIX) for k in state):
        parts = _parse_kohya(state, path, {KOHYA_PREFIX + p.replace(".", "_"): p for p in linear_paths})
    elif any(k.startswith(DIFFUSERS_PREFIX) and ".lora" in k for k in state):
        parts = _parse_diffusers(state, metadata, path)
    else:
        raise LoRAError(f"{path} has no LoRA keys (found e.g. {next(iter(state))!r}); expected unet.<module>.lora_A.weight "
                        "(diffusers) or lora_unet_<module>.lora_down.weight (kohya), check that this is a UNet LoRA file.")

    known = set(linear_paths)
    for module, part in parts.items():
        if module not in known:
            raise LoRAError(f"The LoRA in {path} names {module}, a module this UNet lacks; "
                            "use a LoRA trained for this UNet's architecture.")
        if "A" not in part or "B" not in part:
            raise LoRAError(f"The LoRA in {path} has only half of {module} (both A/down and B/up are needed); the file is incomplete.")
        A, B = part["A"], part["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LoRAError(f"The LoRA in {path} has {module} with A {tuple(A.shape)} and B {tuple(B.shape)}, but expected "
                            "A (r, in) and B (out, r) with the same rank r; the file is damaged.")

    existing = lora_layers(unet)
    if existing and set(parts) - set(existing):
        extra = sorted(set(parts) - set(existing))[0]
        raise LoRAError(f"The LoRA in {path} updates {extra}, which this UNet's LoRA layers do not cover; "
                        "call remove_lora(unet) first to load it from scratch.")
    if not existing:
        unet.requires_grad_(False)
    params = []
    for module, part in parts.items():
        layer = existing.get(module)
        if layer is None:
            layer = LoRALinear(unet.get_submodule(module), part["A"].shape[0], part["alpha"])
            _set_module(unet, module, layer)
        A, B = part["A"], part["B"]
        expected_A, expected_B = tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
        if tuple(A.shape) != expected_A or tuple(B.shape) != expected_B:
            raise LoRAError(f"Rank mismatch for {module} in {path}: the file has A {tuple(A.shape)}, B {tuple(B.shape)}, "
                            f"this UNet's LoRA expects A {expected_A}, B {expected_B}; call remove_lora(unet) first "
                            "or add_lora with the file's rank.")
        layer.unmerge()
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.alpha, layer.scale = part["alpha"], float(scale)
        params += [layer.lora_A, layer.lora_B]
    return params
