"""The package's layers: every import in sdlearn goes down (or sideways), and none goes round in a circle.

    1 models     sdlearn/models/      networks, blocks, checkpoint I/O
    2 diffusion  sdlearn/diffusion/   schedules, samplers, scheduler configs, guidance
    3 pipeline   sdlearn/pipeline/    the denoising loop, images, loading and saving
    4 course     everything else      datasets, referee, widgets, plotting, exercises, recipes, CLI ...

Every `import` is read, function-level ones included (a lazy import is still a dependency).
A module may import from its own layer or a lower one. The lower layers may also import only
the third-party packages listed for them: the models know no plotting, widget or progress bar.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdlearn"

LAYERS = {"models": 1, "diffusion": 2, "pipeline": 3}
COURSE = 4
LAYER_NAMES = {1: "models", 2: "diffusion", 3: "pipeline", 4: "course"}

# Third-party packages each lower layer may import (the course layer may import anything).
THIRD_PARTY = {
    1: {"torch", "numpy", "safetensors", "regex", "ftfy"},
    2: {"torch", "numpy", "tqdm"},
    3: {"torch", "numpy", "safetensors", "PIL", "tqdm", "huggingface_hub"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, package: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], COURSE) if len(parts) > 1 and parts[0] == package else COURSE


def read_imports(path: Path, root: Path) -> list:
    """(line, imported module, top-level name) for every import in the file, at any depth."""
    package = root.name
    this = module_name(path, root)
    is_package = path.name == "__init__.py"
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = this.split(".") if is_package else this.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                # `from sdlearn.pipeline import stable_diffusion` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else target))
    out = []
    for line, target in found:
        top = target.split(".")[0]
        if top == package:
            # the deepest module of the package that the name refers to
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
        out.append((line, target, top))
    return out


def check_layers(root: Path) -> tuple:
    """(violations, graph): messages for upward or forbidden imports, and the import graph."""
    package = root.name
    violations, graph = [], {}
    for path in sorted(root.rglob("*.py")):
        this = module_name(path, root)
        mine = layer_of(this, package)
        rel = path.relative_to(root.parent)
        graph.setdefault(this, [])
        for line, target, top in read_imports(path, root):
            if top == package:
                if target == this:
                    continue
                graph[this].append((target, f"{rel}:{line}"))
                theirs = layer_of(target, package)
                if theirs > mine:
                    violations.append(
                        f"{rel}:{line}: {this} ({LAYER_NAMES[mine]}, layer {mine}) imports {target} "
                        f"({LAYER_NAMES[theirs]}, layer {theirs}). Imports go down only: move the shared code "
                        f"into layer {mine} or below, or call it from layer {theirs}."
                    )
            elif mine in THIRD_PARTY and top not in sys.stdlib_module_names and top not in THIRD_PARTY[mine]:
                violations.append(
                    f"{rel}:{line}: {this} ({LAYER_NAMES[mine]}, layer {mine}) imports {top}, which that layer may "
                    f"not use (allowed: {sorted(THIRD_PARTY[mine])}). Plotting, widgets and datasets belong to the course layer."
                )
    return violations, graph


def find_cycles(graph: dict) -> list:
    """Each import cycle once, as a message naming every file and line on it."""
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target, where in graph.get(node, []):
            if state.get(target) == "open":
                ring = stack[stack.index(target):] + [target]
                edges = []
                for a, b in zip(ring, ring[1:]):
                    edges.append(next(w for t, w in graph[a] if t == b) + f" ({a} -> {b})")
                cycles.append("import cycle: " + "; ".join(edges) + ". Break it by moving the shared part down a layer.")
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_sdlearn_imports_go_down_only():
    violations, _ = check_layers(PACKAGE)
    assert not violations, "\n".join(violations)


def test_sdlearn_has_no_import_cycles():
    _, graph = check_layers(PACKAGE)
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(cycles)


def test_every_module_is_read():
    _, graph = check_layers(PACKAGE)
    assert {"sdlearn.models.unet", "sdlearn.diffusion.samplers", "sdlearn.pipeline.stable_diffusion",
            "sdlearn.datasets", "sdlearn.widgets"} <= set(graph)
    # the lazy import inside a function counts: the pipeline's single-file save reaches single_file
    assert any(t == "sdlearn.pipeline.single_file" for t, _ in graph["sdlearn.pipeline.stable_diffusion"])


# The checker itself, on small planted trees -------------------------------------------


def plant(tmp_path: Path, files: dict) -> Path:
    root = tmp_path / "sdlearn"
    for name, text in {"__init__.py": "", "models/__init__.py": "", "diffusion/__init__.py": "",
                       "pipeline/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_planted_upward_import_is_named_with_file_line_and_rule(tmp_path):
    root = plant(tmp_path, {
        "datasets.py": "X = 1\n",
        "models/vae.py": "import torch\n\n\ndef load():\n    from sdlearn.datasets import X  # lazy, still upward\n    return X\n",
    })
    violations, _ = check_layers(root)
    assert len(violations) == 1
    assert violations[0].startswith("sdlearn/models/vae.py:5: sdlearn.models.vae (models, layer 1) imports sdlearn.datasets (course, layer 4)")
    assert "Imports go down only" in violations[0]


def test_a_planted_forbidden_package_and_relative_import_are_caught(tmp_path):
    root = plant(tmp_path, {
        "widgets.py": "Y = 2\n",
        "diffusion/samplers.py": "import matplotlib.pyplot as plt\nfrom ..widgets import Y\n",
    })
    violations, _ = check_layers(root)
    assert any("diffusion/samplers.py:1:" in v and "imports matplotlib" in v for v in violations)
    assert any("diffusion/samplers.py:2:" in v and "imports sdlearn.widgets (course, layer 4)" in v for v in violations)


def test_a_planted_cycle_within_a_layer_is_found(tmp_path):
    root = plant(tmp_path, {
        "pipeline/loop.py": "from sdlearn.pipeline.saving import save\n",
        "pipeline/saving.py": "def save():\n    from sdlearn.pipeline.loop import run\n",
    })
    violations, graph = check_layers(root)
    assert not violations  # sideways is allowed ...
    cycles = find_cycles(graph)
    assert len(cycles) == 1  # ... a circle is not
    assert "sdlearn/pipeline/loop.py:1" in cycles[0] and "sdlearn/pipeline/saving.py:2" in cycles[0]


def test_downward_imports_pass(tmp_path):
    root = plant(tmp_path, {
        "models/unet.py": "import torch\n",
        "diffusion/samplers.py": "from sdlearn.models.unet import torch\n",
        "pipeline/loop.py": "from sdlearn.diffusion import samplers\nfrom PIL import Image\n",
        "widgets.py": "import matplotlib\nfrom sdlearn.pipeline.loop import samplers\n",
    })
    violations, graph = check_layers(root)
    assert violations == [] and find_cycles(graph) == []


@pytest.mark.parametrize("name", ["unet", "vae", "clip", "samplers", "datasets"])
def test_public_module_paths_of_the_design_still_import(name):
    """shared/DESIGN.md section 3: these import paths are a contract with code outside the repo."""
    import importlib

    module = importlib.import_module(f"sdlearn.{name}")
    expected = {"unet": ["UNet", "UNetConfig"], "vae": ["AutoencoderKL", "DiagonalGaussian"],
                "clip": ["CLIPTextModel", "CLIPTokenizer"], "samplers": ["get_sampler", "SAMPLER_NAMES", "sampler_from_config"],
                "datasets": ["Shapes", "render", "HELD_OUT"]}[name]
    for attribute in expected:
        assert hasattr(module, attribute), f"sdlearn.{name}.{attribute} is part of the public API"


def test_top_level_api():
    import sdlearn
    from sdlearn.pipeline import StableDiffusion
    from sdlearn.pipeline.loading import load_pipeline

    assert sdlearn.load_pipeline is load_pipeline
    assert callable(sdlearn.doctor) and StableDiffusion.__module__ == "sdlearn.pipeline.stable_diffusion"
