"""Training recipes: each module trains and saves one shipped model (python -m sdlearn.recipes.NAME --out ...)."""

import shutil
from pathlib import Path


def work_folder(out: Path) -> Path:
    """Where a recipe keeps its checkpoints while it trains: <out>-work next to <out>."""
    out = Path(out)
    return out.with_name(out.name + "-work")


def prepare_work_folder(out: Path, marker: str, what: str, resume: bool, overwrite: bool) -> Path:
    """Check that a run may write to `out` and return its (created) work folder.

    A finished model (`out/marker` exists) is never replaced without overwrite, and an
    unfinished run's work folder is never discarded without overwrite: resume continues it.
    """
    out = Path(out)
    work = work_folder(out)
    if (out / marker).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds {what}. Pass --overwrite to replace it, or choose another --out.")
    if work.exists() and not (resume or overwrite):
        raise FileExistsError(f"{work} holds an unfinished run. Pass --resume to continue it, or --overwrite to start again.")
    if overwrite and work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work
