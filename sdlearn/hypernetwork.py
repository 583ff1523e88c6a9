"""Hypernetworks: personalising a frozen UNet by reshaping what its attention layers see, in the
layout of AUTOMATIC1111's stable-diffusion-webui (NovelAI's technique, 2022).

Notation (used everywhere below):
    x      (B, L_q, d_q)   the image tokens an Attention layer attends from
    c      (B, L_k, d)     its context: the text tokens in cross-attention (attn2), c = x in
                           self-attention (attn1); d is the context width (e.g. 320, 640, 768, 1280)
    W_k, W_v               the frozen key and value projections (`to_k`, `to_v`), (inner, d)
    f_k, f_v               two small MLPs d -> d, one pair per context width d: the only trained numbers
    s                      the strength (A1111's "multiplier"); 0 switches the hypernetwork off

A hypernetwork leaves the queries alone and passes the context through a residual MLP before
the key and value projections:

    q = W_q x
    k = W_k (c + s * f_k(c))
    v = W_v (c + s * f_v(c))
    out = softmax(q k^T / sqrt(d_head)) v W_out + b_out

The pair used by a layer is picked by the width d of its context alone, exactly as A1111 does
(`hypernetwork.layers[context.shape[2]]`): every attention layer whose context is d wide shares
one pair, self-attention included. When the text width equals a block width (SD 1.x: none;
the course's mini-SD: both 64), that pair serves both kinds of layer.

The MLP (A1111's HypernetworkModule) is an `nn.Sequential` named `linear`, built from
`layer_structure` (multipliers of d that start and end with 1): for [1, 2, 1]

    Linear(d, 2d), [activation], [LayerNorm(2d)], [Dropout], Linear(2d, d), [LayerNorm(d)]

- an activation follows every Linear except the last (the last too if `activate_output`); the
  activation "linear" adds no module at all. "swish" means nn.Hardswish (A1111's table), and any
  other torch activation class is known by its lower-case name ("gelu", "silu", "mish", ...);
- a LayerNorm follows every Linear, the last one included, if `is_layer_norm`;
- a Dropout(p) follows Linear i if `dropout_structure[i + 1] > 0`.
So the integer indices of the state-dict keys depend on the structure: [1, 2, 1] "linear" gives
`linear.0.*` and `linear.1.*`; with "relu" and layer norm it gives linear.0 (Linear), 1 (ReLU),
2 (LayerNorm), 3 (Linear), 4 (LayerNorm).

Initialisation (`weight_initialization`, A1111's names): "Normal" (the default) draws every
Linear weight, the last layer's too, from N(0, 0.01^2) and sets the biases to 0; every LayerNorm
gets the same (weight N(0, 0.01^2), bias 0), whatever the choice. "XavierUniform",
"XavierNormal", "KaimingUniform", "KaimingNormal" draw the Linear weights that way and zero the
biases. A1111 does *not* zero the last layer (LoRA's B = 0 trick), so training starts close to
the base model, not on it: with "Normal" and [1, 2, 1], f(c) is about 0.01^2 * d * sqrt(2) |c|
in size (~1% of c for d = 64, ~10% for d = 768). Set the strength to 0, or zero the last
Linear yourself, to start exactly on the base model.

Strength in training: A1111 multiplies by s only in eval mode; in train mode the factor is 1.
sdlearn does the same: the MLPs are submodules of the UNet, so `unet.train()` switches them to
train mode (factor 1, dropout on) and `unet.eval()` back (factor s, dropout off).

File (A1111's `models/hypernetworks/<name>.pt`, a pickled dict read here with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers):

    {d: (state_dict of f_k, state_dict of f_v) for each width d (int keys),
     "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
     "use_dropout", "activate_output", "last_layer_dropout", "dropout_structure",
     "optional_info", "step", "sd_checkpoint", "sd_checkpoint_name"}

References: AUTOMATIC1111 stable-diffusion-webui `modules/hypernetworks/hypernetwork.py`
(HypernetworkModule, parse_dropout_structure, Hypernetwork.save/load, apply_hypernetwork,
attention_CrossAttention_forward); NovelAI, "NovelAI Improvements on Stable Diffusion" (2022).
"""

import pickle
from pathlib import Path

import torch
from torch import nn

from sdlearn.models.attention import Attention
from sdlearn.models.files import write_file  # atomic: a failed save keeps an older file whole

ACTIVATIONS = {  # A1111's own table; other torch activations are found by lower-case class name
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
NORMAL_STD = 0.01
DROPOUT_P = 0.3  # what A1111's use_dropout means
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",  # the first hypernetworks
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetworkError(ValueError):
    """A hypernetwork file or call does not fit the UNet it is used with."""


# 1. The MLP --------------------------------------------------------------------------------


def activation_class(name):
    """The nn.Module class of an A1111 activation name (None for "linear": no module)."""
    if name is None or name == "linear":
        return None
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    found = {n.lower(): c for n, c in vars(nn.modules.activation).items()
             if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == nn.modules.activation.__name__}
    if name not in found:
        raise HypernetworkError(f"Unknown activation {name!r}; use one of {sorted(ACTIVATIONS)} "
                                "or the lower-case name of a torch activation such as 'gelu'.")
    return found[name]


def dropout_structure_for(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's parse_dropout_structure: [1, 2, 1] -> [0, 0, 0], or [0, 0.3, 0] with last_layer_dropout."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [DROPOUT_P] * (len(layer_structure) - 3) + [DROPOUT_P if last_layer_dropout else 0.0, 0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP: c -> c + s * linear(c), with s = 1 in train mode (A1111's rule)."""

    def __init__(self, dim: int, layer_structure=(1, 2, 1), activation: str = "linear", layer_norm: bool = False,
                 dropout_structure=None, activate_output: bool = False, device=None, dtype=None):
        super().__init__()
        structure = list(layer_structure)
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or any(m <= 0 for m in structure):
            raise HypernetworkError(f"layer_structure must start and end with 1 and hold positive multipliers, "
                                    f"got {structure}; use e.g. (1, 2, 1).")
        dropout = list(dropout_structure) if dropout_structure is not None else [0.0] * len(structure)
        if len(dropout) != len(structure) or any(not 0 <= p < 1 for p in dropout):
            raise HypernetworkError(f"dropout_structure must have one probability in [0, 1) per entry of layer_structure "
                                    f"{structure}, got {dropout}.")
        act = activation_class(activation)
        factory = {"device": device, "dtype": dtype}
        layers = []
        for i in range(len(structure) - 1):
            width_in, width_out = int(dim * structure[i]), int(dim * structure[i + 1])
            layers.append(nn.Linear(width_in, width_out, **factory))
            last = i == len(structure) - 2
            if act is not None and (not last or activate_output):
                layers.append(act())
            if layer_norm:
                layers.append(nn.LayerNorm(width_out, **factory))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        self.dim = dim
        self.linear = nn.Sequential(*layers)

    @torch.no_grad()
    def initialise(self, weight_init: str = "Normal", activation: str = "linear") -> None:
        """A1111's initialisation (see the module docstring): LayerNorms and "Normal" get N(0, 0.01^2), bias 0."""
        if weight_init not in INITS:
            raise HypernetworkError(f"Unknown weight_initialization {weight_init!r}; use one of {INITS}.")
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(layer.weight, mean=0.0, std=NORMAL_STD)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(layer.weight)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            nn.init.zeros_(layer.bias)

    def forward(self, c: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        s = 1.0 if self.training else strength
        if s == 0:
            return c  # exactly the base model
        return c + self.linear(c) * s  # (B, L_k, d)


# 2. A pair per width, and the whole hypernetwork -------------------------------------------


class Hypernetwork(nn.Module):
    """Pairs (f_k, f_v) of HypernetworkModule keyed by context width, plus A1111's file fields.

    `layers[str(d)]` is an nn.ModuleList [f_k, f_v]; `pair(d)` returns it or None.
    """

    def __init__(self, widths, layer_structure=(1, 2, 1), activation: str = "linear", layer_norm: bool = False,
                 use_dropout: bool = False, last_layer_dropout: bool = False, dropout_structure=None,
                 activate_output: bool = False, weight_init: str = "Normal", strength: float = 1.0,
                 name: str | None = None, device=None, dtype=None):
        super().__init__()
        self.layer_structure = list(layer_structure)
        self.activation = activation
        self.layer_norm = bool(layer_norm)
        self.use_dropout = bool(use_dropout)
        self.dropout_structure = (list(dropout_structure) if dropout_structure is not None
                                  else dropout_structure_for(self.layer_structure, use_dropout, last_layer_dropout))
        self.activate_output = bool(activate_output)
        self.weight_init = weight_init
        self.strength = float(strength)
        self.name = name
        self.optional_info = None
        self.step = 0
        self.sd_checkpoint = self.sd_checkpoint_name = None
        self._handles = []  # the hooks on to_k / to_v while attached to a UNet
        self.layers = nn.ModuleDict()
        for d in widths:
            self.layers[str(int(d))] = nn.ModuleList([
                HypernetworkModule(int(d), self.layer_structure, activation, layer_norm, self.dropout_structure,
                                   activate_output, device=device, dtype=dtype)
                for _ in ("k", "v")])

    @property
    def widths(self) -> list[int]:
        return [int(d) for d in self.layers]

    def pair(self, width: int):
        return self.layers[str(width)] if str(width) in self.layers else None

    def initialise(self) -> None:
        for pair in self.layers.values():
            for module in pair:
                module.initialise(self.weight_init, self.activation)

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, layer_structure={self.layer_structure}, activation={self.activation!r}, "
                f"strength={self.strength:g}")


class _ApplyBeforeProjection:
    """A forward pre-hook on to_k (which = 0) or to_v (which = 1): the projection sees c + s * f(c).

    A small callable object rather than a lambda, so the hook says what it is when printed.
    """

    def __init__(self, hypernetwork: Hypernetwork, width: int, which: int):
        self.hypernetwork, self.width, self.which = hypernetwork, width, which

    def __call__(self, projection: nn.Module, args: tuple):
        (c,) = args  # (B, L_k, d): the context, or x itself in self-attention
        module = self.hypernetwork.layers[str(self.width)][self.which]
        return (module(c, self.hypernetwork.strength),)

    def __repr__(self) -> str:
        return f"hypernetwork f_{'kv'[self.which]} (width {self.width})"


def hypernetwork_of(unet: nn.Module) -> Hypernetwork | None:
    """The hypernetwork added to `unet` (None if it has none)."""
    found = getattr(unet, "hypernetwork", None)
    return found if isinstance(found, Hypernetwork) else None


def context_widths(unet: nn.Module) -> list[int]:
    """The widths d of the contexts the UNet's attention layers see (to_k's input width), sorted."""
    return sorted({m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)})


def _attach(unet: nn.Module, hypernetwork: Hypernetwork) -> None:
    """Register the hypernetwork as `unet.hypernetwork` and hook every to_k / to_v whose width has a pair."""
    unet.hypernetwork = hypernetwork  # a submodule: .to(), .train(), .eval() reach it; no UNet name changes
    handles = []
    for module in unet.modules():
        if isinstance(module, Attention) and hypernetwork.pair(module.to_k.in_features) is not None:
            width = module.to_k.in_features
            handles.append(module.to_k.register_forward_pre_hook(_ApplyBeforeProjection(hypernetwork, width, 0)))
            handles.append(module.to_v.register_forward_pre_hook(_ApplyBeforeProjection(hypernetwork, width, 1)))
    hypernetwork._handles = handles  # a plain attribute: remove_hypernetwork takes the hooks off again


def _check_fits(unet: nn.Module, widths, source: str) -> None:
    have = context_widths(unet)
    if not have:
        raise HypernetworkError(f"{type(unet).__name__} has no attention layers; a hypernetwork needs a UNet with to_k/to_v.")
    for d in widths:
        if d not in have:
            raise HypernetworkError(f"{source} has a pair for context width {d}, but no attention layer of this UNet sees "
                                    f"that width (it has {have}); use a hypernetwork made for this model.")


def add_hypernetwork(unet: nn.Module, widths=None, layer_structure=(1, 2, 1), activation: str = "linear",
                     strength: float = 1.0, layer_norm: bool = False, use_dropout: bool = False,
                     last_layer_dropout: bool = False, activate_output: bool = False,
                     weight_init: str = "Normal", name: str | None = None) -> list[nn.Parameter]:
    """Give `unet` a new hypernetwork (A1111 initialisation), freeze the UNet, return the MLP parameters.

    widths defaults to every width a to_k of the UNet sees (A1111's default is [768, 320, 640,
    1280], the same set for SD 1.x). Give exactly the returned parameters to the optimiser.
    """
    if hypernetwork_of(unet) is not None:
        raise HypernetworkError("This UNet already has a hypernetwork; call remove_hypernetwork(unet) first "
                                "or keep training the one it has.")
    widths = context_widths(unet) if widths is None else [int(d) for d in widths]
    _check_fits(unet, widths, "The requested hypernetwork")
    weight = next(m.to_k.weight for m in unet.modules() if isinstance(m, Attention))
    hypernetwork = Hypernetwork(widths, layer_structure, activation, layer_norm, use_dropout, last_layer_dropout,
                                None, activate_output, weight_init, strength, name,
                                device=weight.device, dtype=weight.dtype)
    hypernetwork.initialise()
    hypernetwork.train(unet.training)
    unet.requires_grad_(False)
    hypernetwork.requires_grad_(True)
    _attach(unet, hypernetwork)
    return list(hypernetwork.parameters())


def _or_error(unet: nn.Module) -> Hypernetwork:
    hypernetwork = hypernetwork_of(unet)
    if hypernetwork is None:
        raise HypernetworkError("This UNet has no hypernetwork; call add_hypernetwork(unet) or "
                                "load_hypernetwork(unet, path) first.")
    return hypernetwork


def set_strength(unet: nn.Module, strength: float) -> None:
    """Set s (0 = base model, 1 = as trained). It acts in eval mode; in train mode s is 1 (A1111)."""
    _or_error(unet).strength = float(strength)


def remove_hypernetwork(unet: nn.Module) -> Hypernetwork:
    """Take the hooks off and the hypernetwork out of `unet`; return it (it can be saved still).

    The UNet stays frozen (requires_grad=False) as add_hypernetwork left it.
    """
    hypernetwork = _or_error(unet)
    for handle in hypernetwork._handles:
        handle.remove()
    hypernetwork._handles = []
    del unet.hypernetwork
    return hypernetwork


# 3. Files ----------------------------------------------------------------------------------


def save_hypernetwork(unet_or_hypernetwork: nn.Module, path, overwrite: bool = False) -> Path:
    """Write A1111's .pt dict (see the module docstring) atomically; refuse an existing file unless overwrite."""
    hypernetwork = (unet_or_hypernetwork if isinstance(unet_or_hypernetwork, Hypernetwork)
                    else _or_error(unet_or_hypernetwork))
    path = Path(path)
    if path.suffix != ".pt":
        raise HypernetworkError(f"{path} does not end in .pt; A1111 reads hypernetworks from .pt files, name it e.g. mine.pt.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path.")
    state = {}
    for d in hypernetwork.widths:
        f_k, f_v = hypernetwork.pair(d)
        state[d] = tuple({k: v.detach().cpu().clone() for k, v in f.state_dict().items()} for f in (f_k, f_v))
    state.update({
        "step": hypernetwork.step,
        "name": hypernetwork.name or path.stem,
        "layer_structure": hypernetwork.layer_structure,
        "activation_func": hypernetwork.activation,
        "is_layer_norm": hypernetwork.layer_norm,
        "weight_initialization": hypernetwork.weight_init,
        "sd_checkpoint": hypernetwork.sd_checkpoint,
        "sd_checkpoint_name": hypernetwork.sd_checkpoint_name,
        "activate_output": hypernetwork.activate_output,
        "use_dropout": hypernetwork.use_dropout,
        "dropout_structure": hypernetwork.dropout_structure,
        "last_layer_dropout": hypernetwork.dropout_structure[-2] != 0,
        "optional_info": hypernetwork.optional_info,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: torch.save(state, tmp))
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise HypernetworkError(f"There is no hypernetwork file at {path}; pass an A1111 hypernetwork .pt file.")
    if path.suffix == ".safetensors":
        raise HypernetworkError(f"{path} is a .safetensors file, but A1111 hypernetworks are .pt files; "
                                "a .safetensors adapter is usually a LoRA or a textual-inversion embedding.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HypernetworkError(f"{path} needs more than plain tensors to unpickle ({str(exc).splitlines()[0]}); "
                                "it is not loaded for safety (it could run code), re-save it as a plain dict of tensors.") from exc
    except Exception as exc:  # any other failure to read: not a torch file, truncated, ...
        raise HypernetworkError(f"{path} is not a readable torch file ({str(exc).splitlines()[0]}); "
                                "pass an A1111 hypernetwork .pt file.") from exc
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        found = f"keys {sorted(map(str, data))[:5]}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise HypernetworkError(f"{path} holds {found}, not a hypernetwork; the known layout (A1111) is "
                                "{width (int): (state_dict_k, state_dict_v), 'layer_structure': ..., ...}.")
    return data


def _hypernetwork_from(data: dict, path: Path, strength: float) -> Hypernetwork:
    """Build a Hypernetwork from A1111's dict (missing fields get A1111's defaults) and check every tensor."""
    layer_structure = data.get("layer_structure") or [1, 2, 1]
    use_dropout = bool(data.get("use_dropout", False))
    dropout_structure = data.get("dropout_structure")
    widths = [k for k in data if isinstance(k, int)]
    try:
        hypernetwork = Hypernetwork(
            widths, layer_structure, data.get("activation_func") or "linear", bool(data.get("is_layer_norm", False)),
            use_dropout, bool(data.get("last_layer_dropout", False)), dropout_structure,
            bool(data.get("activate_output", True)),  # A1111's default when the field is missing
            data.get("weight_initialization") or "Normal", strength, data.get("name") or path.stem)
    except HypernetworkError as exc:
        raise HypernetworkError(f"{path}: {exc}") from None
    for field in ("optional_info", "sd_checkpoint", "sd_checkpoint_name"):
        setattr(hypernetwork, field, data.get(field))
    hypernetwork.step = int(data.get("step") or 0)

    for d in widths:
        pair = data[d]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise HypernetworkError(f"{path}: width {d} holds {type(pair).__name__}, but the known layout (A1111) is a pair "
                                    "(state_dict_k, state_dict_v); the file is damaged or not a hypernetwork.")
        for which, (module, state) in enumerate(zip(hypernetwork.pair(d), pair)):
            state = {OLD_KEYS.get(k, k): v for k, v in state.items()}
            want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
            where = f"{path}: width {d}, f_{'kv'[which]}"
            if set(got) != set(want):
                raise HypernetworkError(
                    f"{where} has keys {sorted(got)}, but layer_structure {layer_structure} with activation "
                    f"{hypernetwork.activation!r}, is_layer_norm={hypernetwork.layer_norm} and dropout "
                    f"{hypernetwork.dropout_structure} gives {sorted(want)} (A1111's layout: linear.<index>.weight/bias "
                    "in an nn.Sequential); the file's fields do not match its tensors.")
            for key, shape in want.items():
                if got[key] != shape:
                    raise HypernetworkError(f"{where}: {key} has shape {got[key]}, expected {shape} for width {d} and "
                                            f"layer_structure {layer_structure}; the file is damaged.")
                if not torch.isfinite(state[key]).all():
                    raise HypernetworkError(f"{where}: {key} holds NaN or infinite values; the hypernetwork is broken, "
                                            "retrain it or use another file.")
            module.load_state_dict(state)
    return hypernetwork


def load_hypernetwork(unet: nn.Module, path, strength: float = 1.0) -> list[nn.Parameter]:
    """Read an A1111 hypernetwork .pt into `unet` (which must have none yet); return its parameters.

    Everything is checked before the UNet is touched, so a failed load changes nothing. The UNet
    is frozen and the loaded MLPs trainable, as after add_hypernetwork.
    """
    path = Path(path)
    if hypernetwork_of(unet) is not None:
        raise HypernetworkError("This UNet already has a hypernetwork; call remove_hypernetwork(unet) before loading another.")
    data = _read(path)
    _check_fits(unet, [k for k in data if isinstance(k, int)], f"The hypernetwork in {path}")
    hypernetwork = _hypernetwork_from(data, path, strength)
    weight = next(m.to_k.weight for m in unet.modules() if isinstance(m, Attention))
    hypernetwork.to(device=weight.device, dtype=weight.dtype)
    hypernetwork.train(unet.training)
    unet.requires_grad_(False)
    hypernetwork.requires_grad_(True)
    _attach(unet, hypernetwork)
    return list(hypernetwork.parameters())
