"""The concepts lesson 12 teaches mini-SD, and loading a personalised run back into a pipeline.

A run of `python -m sdlearn.recipes.personalise` (LoRA, textual inversion, DreamBooth or a
hypernetwork) writes its files and a training.json that says which method made them; `load_adapter`
reads that and applies the run to a pipeline the method's way. The recipe trains, and
`python -m sdlearn.evaluate concept` measures, with the same CONCEPTS from here.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from sdlearn.datasets import COLOUR_NAMES, SIZES, Shapes, make_caption

METHODS = ("lora", "textual-inversion", "dreambooth", "hypernetwork")


@dataclass(frozen=True)
class Concept:
    """A concept to teach: what its images show and how prompts name it.

    fixed: the attributes every image of the concept has (the star: its shape; the sun: shape,
    colour and size); the others (colours, sizes, every position) vary from image to image.
    placeholder: the new word textual inversion learns; it replaces the fixed attributes' words.
    """

    name: str
    fixed: dict
    colours: tuple = COLOUR_NAMES
    sizes: tuple = SIZES
    placeholder: str = "<concept>"
    initializer: str = "circle"  # textual inversion's new rows start as this word's embedding

    def images(self, n: int, seed: int, size: int = 64) -> tuple:
        """n scenes of the concept: (Shapes dataset, the indices of its items that show the concept)."""
        dataset = Shapes(4 * n, seed=seed, size=size, split="all", captions="full", shapes=(self.fixed["shape"],),
                         colours=self.colours)
        keep = [i for i in range(len(dataset)) if dataset.attributes(i)["size"] in self.sizes][:n]
        if len(keep) < n:
            raise ValueError(f"Could not draw {n} images of {self.name}; ask for fewer.")
        return dataset, keep

    def caption(self, attrs: dict, rng=None, drop_prob: float = 0.0, placeholder: bool = False) -> str:
        """A prompt for a scene of the concept; with placeholder=True the concept's words become the placeholder."""
        if not placeholder:
            return make_caption(attrs, rng, drop_prob)
        free = {k: v for k, v in attrs.items() if k not in self.fixed or k == "shape"}
        return make_caption(free, rng, drop_prob).replace(attrs["shape"], self.placeholder)


CONCEPTS = {
    "star": Concept("star", {"shape": "star"}, placeholder="<star>"),
    "sun": Concept("sun", {"shape": "circle", "colour": "yellow", "size": "large"}, colours=("yellow",), sizes=("large",),
                   placeholder="<sun>"),
}


def read_record(folder) -> dict:
    """The training.json of a personalise run: which method, concept and base model it holds."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --adapter must be a folder written by python -m sdlearn.recipes.personalise "
                                "(e.g. data/lora-star).")
    record = json.loads(path.read_text())
    if record.get("method") not in METHODS or not record.get("files"):
        raise ValueError(f"{path} records method {record.get('method')!r} and files {record.get('files')!r}; "
                         f"expected one of {', '.join(METHODS)} and the files the run wrote.")
    missing = [name for name in record["files"] if not (Path(folder) / name).exists()]
    if missing:
        how = " (`make train-dreambooth-star` remakes the fine-tuned UNets, which are not shipped)" if record["method"] == "dreambooth" else ""
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}, which its training.json lists{how}.")
    return record


def load_adapter(pipe, folder, scale: float = 1.0) -> dict:
    """Apply the run saved in `folder` to `pipe` (in place) the way its method works; return its record.

    lora: sdlearn.lora.load_lora; textual-inversion: load_embedding (the placeholder becomes a
    word of pipe.tokenizer); dreambooth: the fine-tuned UNet replaces pipe.unet; hypernetwork:
    sdlearn.hypernetwork.load_hypernetwork. scale: the LoRA scale or the hypernetwork strength.
    """
    folder = Path(folder)
    record = read_record(folder)
    files = [folder / name for name in record["files"]]
    method = record["method"]
    if method == "lora":
        from sdlearn.lora import load_lora

        load_lora(pipe.unet, files[0], scale=scale)
    elif method == "textual-inversion":
        from sdlearn.textual_inversion import load_embedding

        load_embedding(files[0], pipe.tokenizer, pipe.text_encoder, token=record["placeholder"])
    elif method == "dreambooth":
        from sdlearn.models.unet import UNet

        pipe.unet = UNet.from_pretrained(files[0]).to(pipe.device, pipe.dtype).eval()
    else:
        from sdlearn.hypernetwork import load_hypernetwork

        load_hypernetwork(pipe.unet, files[0], strength=scale)
    return record
