"""The environment doctor: is this machine ready for the course?

`sdlearn.doctor()` prints what the lessons depend on (versions, device, threads, the
widget front end, the Jupyter kernel, the shipped data) and flags, in plain words,
anything that will break or slow down a lesson. It returns a `Report` so tests and
notebooks can assert on it.
"""

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Shipped artefacts the lessons load, and the make target that reproduces each.
SHIPPED = {
    "tokenizers/clip-vit-l14": None,
    "tokenizers/shapes": None,
    "tiny-vae": "train-tiny-vae",
    "shapes-classifier": "train-classifier",
    "ddpm-shapes": "train-ddpm",
    "mini-sd": "train-mini-sd",
}
PACKAGES = ("torch", "numpy", "diffusers", "transformers", "tokenizers", "ipywidgets", "jupyterlab", "matplotlib")


@dataclass
class Report:
    versions: dict = field(default_factory=dict)
    device: str = "cpu"
    device_detail: str = ""
    threads: int = 1
    cpus: int = 1
    widgets_frontend: bool = False
    kernel_registered: bool = False
    data_dir: str = ""
    data: dict = field(default_factory=dict)  # shipped artefact -> present?
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def pinned_versions(requirements: Path | None = None) -> dict:
    """name -> version from requirements.txt (the single source of exact versions)."""
    requirements = requirements or Path(__file__).resolve().parent.parent / "requirements.txt"
    pins = {}
    if requirements.is_file():
        for line in requirements.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows. Training times
    in data/ are only comparable between runs on the same kind of CPU, so reports record it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _kernel_registered() -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return "sdlearn" in KernelSpecManager().find_kernel_specs()
    except Exception:  # jupyter_client missing or broken: then the kernel is not usable either
        return False


def check() -> Report:
    """Collect the report without printing it."""
    import torch

    from sdlearn.datasets import data_dir

    report = Report()
    report.versions = {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}
    report.versions["torch"] = torch.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.device, report.device_detail = "cuda", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        report.device, report.device_detail = "mps", "Apple silicon GPU"
    else:
        report.device, report.device_detail = "cpu", cpu_name()
    report.threads, report.cpus = torch.get_num_threads(), os.cpu_count() or 1
    report.widgets_frontend = _version("jupyterlab_widgets") is not None
    report.kernel_registered = _kernel_registered()
    folder = data_dir()
    report.data_dir = str(folder)
    report.data = {name: (folder / name).exists() for name in SHIPPED}

    warn = report.warnings.append
    if sys.version_info < (3, 11):
        warn(f"Python {platform.python_version()} is too old: the course needs 3.11 or newer.")
    pins = pinned_versions()
    for package in ("torch", "diffusers", "transformers", "numpy"):
        have, want = report.versions.get(package), pins.get(package)
        if have and want and have.split("+")[0] != want:
            warn(f"{package} {have} is installed but the course is tested with {want}; run `make lab` to reinstall the pins.")
    if not report.widgets_frontend:
        warn("The ipywidgets front end (jupyterlab_widgets) is missing: sliders will show as text. Run `make lab`.")
    if not report.kernel_registered:
        warn("The Jupyter kernel `sdlearn` is not registered. Run `make lab` (it registers it).")
    if not folder.is_dir():
        warn(f"No data folder at {folder}. Run from a clone of the repository, or set SDLEARN_DATA.")
    else:
        for name, present in report.data.items():
            if not present:
                target = SHIPPED[name]
                fix = f"`make {target}` recreates it" if target else "restore it from git"
                warn(f"data/{name} is missing ({fix}); the lessons that load it will fail.")
    if report.device == "cpu" and report.threads < 2 and report.cpus >= 2:
        warn(f"torch uses {report.threads} thread(s) of {report.cpus} CPUs; lessons will be slow. Unset OMP_NUM_THREADS.")
    return report


def doctor() -> Report:
    """Print the environment report with clear warnings; return it."""
    report = check()
    print("sdlearn doctor")
    for name, version in report.versions.items():
        print(f"  {name:<13}{version or 'NOT INSTALLED'}")
    print(f"  {'device':<13}{report.device} ({report.device_detail})")
    print(f"  {'threads':<13}{report.threads} torch threads, {report.cpus} CPUs")
    print(f"  {'widgets':<13}{'front end installed' if report.widgets_frontend else 'front end MISSING'}")
    print(f"  {'kernel':<13}{'sdlearn registered' if report.kernel_registered else 'sdlearn NOT registered'}")
    print(f"  {'data':<13}{report.data_dir}")
    for name, present in report.data.items():
        print(f"  {'':<13}{'ok     ' if present else 'missing'} {name}")
    if report.ok:
        print("All good: every lesson should run.")
    for message in report.warnings:
        print(f"WARNING: {message}")
    return report
