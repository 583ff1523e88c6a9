"""Re-execute notebooks in place from a clean kernel, then strip widget state and record the run.

The notebook's metadata gets `sdlearn`: the CPU, whether it has native bfloat16, torch's
threads and the seconds the run took (lesson 00's course map reads it); nbclient records each
cell's start and end in the cell's metadata.

Usage: python tools/execute_notebooks.py notebooks/03_forward_noising.ipynb [...] [--force]

A notebook with uncommitted changes is refused unless --force is given, so that running
`make notebooks` never silently overwrites a learner's own work.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def has_uncommitted_changes(path: Path) -> bool:
    result = subprocess.run(
        ["git", "status", "--porcelain", "--", str(path)], capture_output=True, text=True
    )
    return result.returncode == 0 and any(
        line and not line.startswith("??") for line in result.stdout.splitlines()
    )


def strip_widget_state(nb) -> None:
    """Drop saved widget models: they bloat the file and go stale; the text fallback stays."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_VIEW, None)


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="sdlearn", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    seconds = time.perf_counter() - start
    strip_widget_state(nb)
    nb.metadata["sdlearn"] = run_record(seconds, nb.metadata.get("sdlearn", {}).get("runs", {}))
    nb.metadata["kernelspec"] = {"name": "sdlearn", "display_name": "sdlearn (Python 3)", "language": "python"}
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    return seconds


def run_record(seconds: float, runs: dict | None = None) -> dict:
    """Where and how long the saved outputs were made (lesson 00 reads it: sdlearn.lessons.lesson_times).

    `runs` keeps the latest run on each class of CPU ("native bf16", "no native bf16"): a CPU
    without native bfloat16 takes 2 to 3 times longer, and lesson 00 shows both classes.
    """
    import torch

    from sdlearn.doctor import cpu_name
    from sdlearn.lessons import cpu_class
    from sdlearn.train import native_bf16

    record = {"cpu": cpu_name(), "native_bf16": native_bf16(), "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 1)}
    runs = dict(runs or {})
    runs[cpu_class(record["native_bf16"])] = {key: record[key] for key in ("cpu", "torch_threads", "seconds")}
    return {**record, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--force", action="store_true", help="overwrite notebooks with uncommitted changes")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        if not args.force and has_uncommitted_changes(path):
            print(
                f"refusing to overwrite {path}: it has uncommitted changes (your own work?).\n"
                f"Commit or copy it first, or run: python tools/execute_notebooks.py {path} --force",
                file=sys.stderr,
            )
            return 2
    for path in args.notebooks:
        seconds = execute(path, args.timeout)
        print(f"{path}: executed in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
