"""sdlearn: Stable Diffusion from the ground up.

The package behind the course notebooks. Each module teaches one concept; see README.md
for the course map. The same classes that train at toy size on a laptop CPU load the real
Stable Diffusion weights.

Top-level names are imported on first use, so `import sdlearn` stays fast.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "doctor": "sdlearn.doctor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdlearn' has no attribute {name!r}")
