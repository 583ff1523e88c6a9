"""sdlearn: Stable Diffusion from the ground up.

The package behind the course notebooks. Each module teaches one concept; see README.md
for the course map. The same classes that train at toy size on a laptop CPU load the real
Stable Diffusion weights.

Top-level names are imported on first use, so `import sdlearn` stays fast.
"""

import importlib

__version__ = "0.1.0"

# Imported eagerly (it needs only the standard library until called): the function must
# shadow the submodule of the same name, or `sdlearn.doctor` would become the module once
# anything imports `sdlearn.doctor` directly.
from sdlearn.doctor import doctor  # noqa: E402

# name -> module that defines it
_LAZY = {
    "load_pipeline": "sdlearn.pipeline.loading",
}

__all__ = ["__version__", "doctor", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdlearn' has no attribute {name!r}")
