"""Saving that never loses what was there: atomic file writes and folder saves.

Every file sdlearn saves (model folders, pipeline folders, tokenizers, single .safetensors
files) goes through this module, so that a save that fails halfway (a read-only folder, a
full disk, an exception) or a process that is killed never leaves a broken model behind:

- `write_file(path, write)`: `write` fills a temporary file next to `path`
  (`.<name>.<pid>.saving-XXXX`); it is flushed to disk (fsync) and then renamed over `path`
  in one step (os.replace). Until that rename, `path` is the old file; after it, the new one.
- `save_folder(folder, write)`: `write` builds the whole new model in a temporary sibling
  folder (`.<folder>.<pid>.saving-XXXX`). Only when it is complete are its files moved into
  `folder`, one os.replace each. Files in `folder` that we do not write (a learner's
  `unet/my_lora.safetensors`, notes, images) are never touched. If a move fails, every file
  already moved is put back, so the folder holds exactly the old model again.
- Files get ordinary permissions: 0666 minus the umask (0644 with the usual umask 022),
  as a plain `open(path, "w")` would give, not the 0600 of a temporary file.
- Temporaries are removed when a save fails. Those of a killed process (its pid no longer
  runs) are removed by the next save into the same place.

A process killed during the moves (they take milliseconds) can leave some files new and
some old; each file is always complete, never truncated.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

SAVING = "saving"  # marks our temporaries: .<name>.<pid>.saving-XXXX


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 minus the process umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}.{SAVING}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: leave its files alone
    return True


def remove_abandoned(parent: Path, name: str) -> list[Path]:
    """Remove temporaries for `name` in `parent` left by processes that no longer run (killed saves)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.{SAVING}-")
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_file(path, write: Callable[[Path], None]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary sibling, which replaces `path` when complete.

    If `write` raises (or the process dies), `path` keeps its old content and no temporary is left
    (a killed process's temporary is removed by the next write to `path`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name))
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file what open() would
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path, text: str) -> Path:
    """write_file for text (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _files_under(root: Path) -> list[Path]:
    """Relative paths of the files under root, deepest first (so top-level files such as
    model_index.json are moved in last)."""
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(files, key=lambda p: (-len(p.parts), str(p)))


def save_folder(folder, write: Callable[[Path], None], superseded: Iterable[str] = ()) -> Path:
    """Save a model folder without ever leaving a broken one: build it aside, then swap our files in.

    write(staging) writes the complete new model into `staging`, an empty temporary sibling of
    `folder`; the files it writes are ours. They are then moved into `folder` one by one
    (os.replace); an old file of the same name is kept aside until all moves succeeded, and put
    back if any fails. Other files in `folder` are left alone, except the relative paths in
    `superseded` (format files we no longer write that would shadow ours, e.g. a tokenizer.json
    next to a new vocab.json), which are removed with the same rollback.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder. Choose a folder path to save the model into.")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, folder.name)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(folder.name)))
    backup = staging / ".old"  # the old versions of the files we replace (inside staging: one temporary)
    try:
        new = staging / "new"
        new.mkdir()
        write(new)
        ours = _files_under(new)
        mode = file_mode()
        for rel in ours:
            os.chmod(new / rel, mode)  # some writers (safetensors) create files 0600
            fsync_file(new / rel)
        _swap_in(new, folder, ours, backup, [Path(s) for s in superseded if Path(s) not in set(ours)])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _swap_in(new: Path, folder: Path, ours: list[Path], backup: Path, superseded: list[Path]) -> None:
    done = []  # (target, old copy or None, moved out), in the order they were made
    created = []  # folders that did not exist before (removed again on failure, if empty)
    try:
        for rel in superseded:
            target = folder / rel
            if target.is_file():
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, backup / rel)
                done.append((target, backup / rel, True))
        for rel in ours:
            target = folder / rel
            for directory in reversed(target.parents):
                if not directory.exists():
                    directory.mkdir()
                    created.append(directory)
            old = None
            if target.exists() or target.is_symlink():
                old = backup / rel
                old.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target, old, follow_symlinks=False)  # the old file stays in place until replaced
                except OSError:
                    shutil.copy2(target, old, follow_symlinks=False)
            os.replace(new / rel, target)
            done.append((target, old, False))
    except BaseException:
        for target, old, moved_out in reversed(done):
            try:
                if old is not None:
                    os.replace(old, target)
                elif not moved_out:
                    target.unlink(missing_ok=True)
            except OSError:
                pass
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                pass
        raise
    for directory in sorted({(folder / rel).parent for rel in ours} | {folder}, key=lambda p: -len(p.parts)):
        fsync_dir(directory)


def save_pipeline_folder(folder, parts: dict, scheduler_config: dict, model_index: dict,
                         superseded: Iterable[str] = ()) -> Path:
    """Save a diffusers pipeline folder (with save_folder's all-or-nothing swap): each model of
    `parts` (subfolder name -> an object with write_files(path)) in its subfolder, then
    scheduler/scheduler_config.json and model_index.json."""
    import json

    def write(staging: Path) -> None:
        for name, part in parts.items():
            part.write_files(staging / name)
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
        (staging / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")

    return save_folder(folder, write, superseded=superseded)

