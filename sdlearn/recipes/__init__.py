"""Training recipes: each module trains and saves one shipped model (python -m sdlearn.recipes.NAME --out ...)."""

import shutil
from pathlib import Path

WORK_SETTINGS = "config.json"  # the settings a run writes into its work folder first (not work to keep)


def work_folder(out: Path) -> Path:
    """Where a recipe keeps its checkpoints while it trains: <out>-work next to <out>."""
    out = Path(out)
    return out.with_name(out.name + "-work")


def check_out_folder(out: Path, outputs, what: str, overwrite: bool) -> None:
    """Refuse, before any training, an --out that the run could not write at its end.

    outputs: the paths (relative to out) the recipe writes; any of them present means a
    previous model is there, which only overwrite replaces. Also refused: an --out that is a
    file, or under a folder where nothing can be created.
    """
    from sdlearn.cli import can_create_in  # one definition of "can we write there"

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder. Choose a folder for the model.")
    found = [name for name in outputs if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{out} already holds {what} ({', '.join(found)}). Pass --overwrite to replace it, or choose another --out."
        )
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not can_create_in(existing):
        raise PermissionError(f"--out {out}: nothing can be written in {existing} (no permission, or read-only). Choose another --out.")


def holds_unfinished_run(work: Path) -> bool:
    """Whether a work folder holds anything a run could resume from (a checkpoint, a finished stage),
    rather than only the run's settings or nothing (a run that failed before its first checkpoint)."""
    work = Path(work)
    return work.is_dir() and any(p.is_file() and p.relative_to(work) != Path(WORK_SETTINGS) for p in work.rglob("*"))


def run_keeping_only_resumable_work(out: Path, run):
    """run(), and if it fails, remove the work folder it created unless it holds something to resume.

    So a command that fails before its first checkpoint (a wrong setting found late, an error
    in the data, Ctrl-C in the first minute) leaves nothing that would block the corrected
    command; one that fails later keeps its checkpoints for --resume.
    """
    work = work_folder(out)
    existed = work.exists()
    try:
        return run()
    except BaseException:
        if not existed and work.is_dir() and not holds_unfinished_run(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def prepare_work_folder(out: Path, marker, what: str, resume: bool, overwrite: bool) -> Path:
    """Check that a run may write to `out` and return its (created) work folder.

    marker: the output path(s) (relative to out) that mean a finished model is there; it is
    never replaced without overwrite. An unfinished run's work folder is never discarded
    without overwrite: resume continues it.
    """
    out = Path(out)
    check_out_folder(out, (marker,) if isinstance(marker, str) else tuple(marker), what, overwrite)
    work = work_folder(out)
    if work.exists() and not work.is_dir():
        raise FileExistsError(f"{work} (where the run keeps its checkpoints) is a file. Move it away or choose another --out.")
    if work.exists() and not (resume or overwrite):
        raise FileExistsError(f"{work} holds an unfinished run. Pass --resume to continue it, or --overwrite to start again.")
    if overwrite and work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work
