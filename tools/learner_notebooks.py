"""Make the learner's copies of the lessons: the same notebooks with every exercise blank.

The lessons in notebooks/ are the one source: they hold the solutions and the saved outputs
a reader sees on GitHub. A learner's copy is derived from them, never edited by hand:

- in every exercise cell, each function body from the marker line on

      # Your code here — this is one correct solution; try writing your own

  becomes `raise NotImplementedError  # your code here` (a docstring above the marker stays);
- every output and execution count is cleared (the learner runs the cells);
- a first cell says where the solutions are.

An exercise cell holds only imports, the exercise functions and their checker calls, and no
later cell reads a name an exercise cell defines (tests/test_learner_notebooks.py checks both),
so the rest of a learner's lesson runs exactly as the solution version does: on a blank, the
checker prints "not written yet" and the next cells use the package's reference.

    python tools/learner_notebooks.py --out lab notebooks/*.ipynb

writes lab/NN_*.ipynb for each lesson that has no copy there yet. It never overwrites a
learner's notebook: a copy that exists is kept, and the command says so (delete it, or pass
another --out, to get a fresh one).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from pathlib import Path

MARKER = "# Your code here — this is one correct solution; try writing your own"
BLANK = "raise NotImplementedError  # your code here"


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def is_exercise_cell(cell: dict) -> bool:
    return cell.get("cell_type") == "code" and MARKER in cell_source(cell)


def exercise_functions(source: str) -> list[tuple[int, ast.FunctionDef]]:
    """(marker line, function) for each marker line of a cell (1-based), with the innermost function that holds it."""
    lines = source.splitlines()
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = []
    for i, line in enumerate(lines, start=1):
        if line.strip() != MARKER:
            continue
        holders = [f for f in functions if f.lineno < i <= f.end_lineno]
        if not holders:
            raise ValueError(f"the marker on line {i} is not inside a function:\n{source}")
        found.append((i, max(holders, key=lambda f: f.lineno)))
    return found


def blank_source(source: str) -> str:
    """The cell's source with each marked function body, from its marker line on, replaced by the blank."""
    lines = source.splitlines()
    for marker, function in sorted(exercise_functions(source), key=lambda mf: mf[0], reverse=True):
        line = lines[marker - 1]
        indent = line[: len(line) - len(line.lstrip())]
        lines[marker - 1 : function.end_lineno] = [indent + BLANK]
    text = "\n".join(lines)
    return text + "\n" if source.endswith("\n") else text


def _intro_cell(source_name: str) -> dict:
    text = (
        f"**Your copy of `notebooks/{source_name}`.** Its exercise cells are blank: write each function where it says "
        "`# your code here`, then run the cell to check it. A blank exercise says *not written yet* and the cells below "
        "carry on with the package's reference, so *Run All* always gets to the end. Stuck? "
        "`ex.check_NAME.solution()` prints the reference, and the lesson in `notebooks/` shows one solution with its "
        "outputs. `make lab` never overwrites this file: delete it to start again from a fresh copy."
    )
    return {"cell_type": "markdown", "metadata": {"tags": ["learner-copy"]}, "source": text}


def learner_notebook(notebook: dict, source_name: str) -> dict:
    """The learner's version of a lesson (a new dict; the input is not changed)."""
    nb = copy.deepcopy(notebook)
    for cell in nb["cells"]:
        if cell.get("cell_type") != "code":
            continue
        if is_exercise_cell(cell):
            cell["source"] = blank_source(cell_source(cell))
        cell["outputs"] = []
        cell["execution_count"] = None
    intro = _intro_cell(source_name)
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):  # cell ids exist from nbformat 4.5
        intro["id"] = "learner-copy"
    nb["cells"].insert(0, intro)
    return nb


def write_learner_copies(sources: list[Path], out: Path) -> list[str]:
    """Write out/<name> for each source without a copy there; return one line per notebook saying what happened."""
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for source in sources:
        target = out / source.name
        if target.exists():
            report.append(f"kept   {target} (already there: your work is not overwritten)")
            continue
        nb = learner_notebook(json.loads(source.read_text(encoding="utf-8")), source.name)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(target)
        report.append(f"wrote  {target}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="the lessons (notebooks/NN_*.ipynb)")
    parser.add_argument("--out", type=Path, default=Path("lab"), help="folder for the learner's copies (default: lab)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    for line in write_learner_copies(args.notebooks, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
