"""Config dataclasses and diffusers/transformers-format folders, shared by every model.

A model folder as diffusers and transformers write it holds `config.json` (the
constructor's arguments plus bookkeeping keys such as `_class_name`) and the weights in
`diffusion_pytorch_model.safetensors` (diffusers) or `model.safetensors` (transformers).
Because sdlearn's parameter names are identical to the libraries', a folder loads with
`strict=True` in either direction; this module adds the explicit checks that turn a wrong
folder into a message that says what was expected.

Each model defines a config dataclass subclassing `ModelConfig` and mixes in `Pretrained`:

    @dataclass
    class UNetConfig(ModelConfig):
        library_class = "UNet2DConditionModel"   # written as `_class_name`
        ...fields named as in the library's config.json...

    class UNet(Pretrained, nn.Module):
        config_class = UNetConfig
        weights_name = "diffusion_pytorch_model.safetensors"
"""

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from sdlearn.models.files import save_folder


class CheckpointError(ValueError):
    """A folder or state dict does not fit the model it is loaded into."""


@dataclasses.dataclass
class ModelConfig:
    """Base for model configs. Field names are those of the library's config.json."""

    # The library's class name, written to config.json so the library can load our folders.
    library_class: ClassVar[str] = ""
    # Keys of the library's config.json that we read but do not need (bookkeeping, or
    # options whose value we check elsewhere). Keys starting with "_" are always ignored.
    ignored_keys: ClassVar[frozenset] = frozenset()
    # Extra keys written to config.json so the library accepts the folder (e.g. model_type).
    extra_keys: ClassVar[dict] = {}
    # Fields whose config.json may hold null although the field is not optional (the config fixes it).
    nullable_keys: ClassVar[frozenset] = frozenset()

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        if not isinstance(config, dict):
            raise CheckpointError(f"A {cls.library_class or cls.__name__} config must be a JSON object (a dict), got {type(config).__name__}.")
        check_class_name(cls, config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in names and not k.startswith("_") and k not in cls.ignored_keys)
        if unknown:
            raise CheckpointError(
                f"{cls.__name__} does not know the config keys {unknown}. "
                f"Expected a {cls.library_class or cls.__name__} config.json; "
                "is this folder for a different kind of model?"
            )
        values = {k: v for k, v in config.items() if k in names}
        check_field_types(cls, values)
        for f in dataclasses.fields(cls):  # JSON has lists where the dataclass has tuples
            if isinstance(values.get(f.name), list):
                values[f.name] = tuple(values[f.name])
        return cls(**values)

    def to_dict(self) -> dict:
        out = {}
        if self.library_class:
            out["_class_name"] = self.library_class
        out.update(self.extra_keys)
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def check_class_name(cls: type, config: dict) -> None:
    """Refuse a config.json written for another class: its `_class_name` (diffusers) or its
    `model_type` / `architectures` (transformers) must name ours when present."""
    what = cls.library_class or cls.extra_keys.get("architectures", [cls.__name__])[0]
    named = config.get("_class_name")
    if named is not None and cls.library_class and named != cls.library_class:
        raise CheckpointError(
            f"This config.json names the class {named} (its _class_name), but {cls.library_class} was expected. "
            f"Point at a {cls.library_class} folder (in a pipeline: unet/ for the UNet, vae/ for the autoencoder)."
        )
    model_type = config.get("model_type")
    if model_type is not None and "model_type" in cls.extra_keys and model_type != cls.extra_keys["model_type"]:
        raise CheckpointError(
            f"This config.json is for model_type {model_type!r}, not {cls.extra_keys['model_type']!r} ({what}). "
            "Point at the folder of that model (e.g. a Stable Diffusion pipeline's text_encoder/)."
        )
    architectures = config.get("architectures")
    if architectures and "architectures" in cls.extra_keys and not set(architectures) & set(cls.extra_keys["architectures"]):
        raise CheckpointError(
            f"This config.json is for {architectures} (its architectures), not {cls.extra_keys['architectures']}. "
            f"Point at the folder of a {what}."
        )


def _describe(annotation) -> str:
    """'an integer', 'a list or null', ...: what a field's annotation accepts, in JSON words."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list",
             dict: "an object", list: "a list", type(None): "null"}
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _fits(value, annotation) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, tuple, unions with None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # 32.0 or "4" are refused: a float width or a string would fail later, far from here
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # JSON writes 1.0 as 1 at times
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (tuple, list) or typing.get_origin(annotation) in (tuple, list):
        return isinstance(value, (list, tuple))
    if annotation is dict:
        return isinstance(value, dict)
    return True  # other annotations are not checked here


def check_field_types(cls: type, values: dict) -> None:
    """CheckpointError for a config value of the wrong type, e.g. block_out_channels: 64 or in_channels: "4".

    Lists are checked element by element against the field's default (a list of ints stays
    a list of ints); a float must be finite.
    """
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in values.items():
        annotation = hints.get(name, Any)
        if value is None and name in cls.nullable_keys:
            continue
        default = defaults.get(name)
        example = f" (the default is {json.dumps(list(default) if isinstance(default, tuple) else default)})" \
            if default is not dataclasses.MISSING else ""
        if not _fits(value, annotation):
            raise CheckpointError(
                f"config.json field {name!r} must be {_describe(annotation)}, got {json.dumps(value)} "
                f"({type(value).__name__}){example}. Fix that value in config.json."
            )
        kind = None  # the type of a list's elements, when the field says it
        if isinstance(value, (list, tuple)):
            if isinstance(default, tuple) and default and all(type(d) is type(default[0]) for d in default):
                kind = type(default[0])
            elif typing.get_origin(annotation) in (typing.Union, types.UnionType) and int in typing.get_args(annotation):
                kind = int  # "one int or one per level", e.g. attention_head_dim: [5, 10, 20, 20]
        if kind in (int, str, float) and not all(_fits(v, kind) for v in value):
            raise CheckpointError(
                f"config.json field {name!r} must be a list of {_describe(kind).split(' ', 1)[1]}s, got "
                f"{json.dumps(value)}{example}. Fix that value in config.json."
            )


def refuse_non_finite(state_dict: dict, source: str) -> None:
    """CheckpointError naming the first tensor that holds NaN or infinity.

    A weight that is not finite makes every output NaN (a black or grey image), so such a
    file is never worth loading silently: its bytes were corrupted (a bad copy or download),
    or it was saved from a run whose loss diverged. Corruption that leaves finite values
    cannot be seen here; compare the file's sha256 with its publisher's for that. Cost: one
    pass over the weights (max |w|), a fraction of the load (tools/bench_finite_check.py measures it).
    """
    for name, tensor in state_dict.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()) or tensor.numel() == 0:
            continue
        if not math.isfinite(tensor.detach().abs().amax().item()):  # NaN propagates through max
            bad = int((~torch.isfinite(tensor.detach())).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} holds {bad} NaN or infinite values of {tensor.numel()}; the file is corrupted "
                "(or was saved from a diverged training run). Download or save it again; check_finite=False loads it anyway."
            )


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No config.json in {folder}. Expected a diffusers/transformers model folder "
            "(config.json plus a .safetensors weights file), e.g. one written by save_pretrained()."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}). The file may be truncated or hand-edited.") from exc


def read_weights(folder: Path, names: tuple, check_finite: bool = True) -> dict:
    """Load the first weights file in `names` that exists; .bin only without unpickling code.

    check_finite: refuse a file whose tensors hold NaN or infinity (see `refuse_non_finite`).
    """
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_file():
            try:
                if path.suffix == ".safetensors":
                    state_dict = load_file(path)
                else:
                    state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"Could not read {path}: {exc}. The file may be truncated or corrupted; re-save or re-download it.") from exc
            if check_finite:
                refuse_non_finite(state_dict, str(path))
            return state_dict
    raise FileNotFoundError(f"No weights in {folder}: expected one of {list(names)}.")


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "the state dict") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(state_dict[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return

    def show(items):
        return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")

    parts = [f"{source} does not fit {type(model).__name__} with this config."]
    if missing:
        parts.append(f"Missing keys: {show(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys: {show(unexpected)}.")
    if wrong_shape:
        parts.append(f"Wrong shapes: {show(wrong_shape)}.")
    parts.append("Is it a checkpoint for a different architecture or size? Check the config.json that goes with it.")
    raise CheckpointError(" ".join(parts))


class Pretrained:
    """from_config / from_pretrained / save_pretrained for an nn.Module with a ModelConfig."""

    config_class: ClassVar[type] = ModelConfig
    weights_name: ClassVar[str] = "diffusion_pytorch_model.safetensors"
    legacy_weights_names: ClassVar[tuple] = ("diffusion_pytorch_model.bin",)

    @classmethod
    def from_config(cls, config: Any):
        """Build a model with random weights from a config dataclass or a config.json dict."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__}.from_config expected a {cls.config_class.__name__} or a dict, got {type(config).__name__}.")
        return cls(config)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, check_finite: bool = True):
        """Load a model folder written by diffusers/transformers or by save_pretrained().

        check_finite: refuse weights that hold NaN or infinity (a corrupted file), naming the
        file and the tensor; False loads them anyway.
        """
        folder = Path(folder)
        if not folder.is_dir():
            hint = f" (there is a file of that name)" if folder.exists() else ""
            raise FileNotFoundError(f"No such folder: {folder}{hint}. Expected a model folder with config.json and weights.")
        try:
            model = cls.from_config(read_config(folder))
        except (CheckpointError, ValueError, TypeError) as exc:
            if str(exc).startswith(str(folder)):
                raise
            raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
        state_dict = read_weights(folder, (cls.weights_name, *cls.legacy_weights_names), check_finite=check_finite)
        model.load_checked_state_dict(state_dict, source=str(folder))
        return model.to(device=device, dtype=dtype)

    def load_checked_state_dict(self, state_dict: dict, source: str = "the state dict") -> None:
        check_state_dict(self, state_dict, source)
        self.load_state_dict(state_dict, strict=True)

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Write config.json and safetensors weights that diffusers/transformers can load.

        An existing model in `folder` is never replaced silently: pass overwrite=True.
        The new files are written aside and swapped in (sdlearn.models.files.save_folder): a save
        that fails leaves the old model as it was, and other files in `folder` are kept.
        """
        folder = Path(folder)
        targets = [folder / "config.json", folder / self.weights_name]
        if not overwrite and any(p.exists() for p in targets):
            raise FileExistsError(f"{folder} already holds a model. Choose another folder or pass overwrite=True.")
        return save_folder(folder, self.write_files)

    def write_files(self, folder) -> None:
        """Write config.json and the weights into `folder` directly (save_pretrained calls this on a temporary folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state_dict, folder / self.weights_name, metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
