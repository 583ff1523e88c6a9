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

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in names and not k.startswith("_") and k not in cls.ignored_keys)
        if unknown:
            raise CheckpointError(
                f"{cls.__name__} does not know the config keys {unknown}. "
                f"Expected a {cls.library_class or cls.__name__} config.json; "
                "is this folder for a different kind of model?"
            )
        values = {k: v for k, v in config.items() if k in names}
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


def read_weights(folder: Path, names: tuple) -> dict:
    """Load the first weights file in `names` that exists; .bin only without unpickling code."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_file():
            try:
                if path.suffix == ".safetensors":
                    return load_file(path)
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"Could not read {path}: {exc}. The file may be truncated or corrupted; re-save or re-download it.") from exc
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
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Load a model folder written by diffusers/transformers or by save_pretrained()."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder. Expected a model folder with config.json and weights.")
        model = cls.from_config(read_config(folder))
        state_dict = read_weights(folder, (cls.weights_name, *cls.legacy_weights_names))
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
