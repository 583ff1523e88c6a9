"""The committed notebooks are what a learner reads on GitHub: their saved outputs must be clean.

No traceback, no stderr stream (warnings), no frozen progress bar, no bare
`<Axes ...>` / `<Figure ...>` repr where a figure should be, no stray `True` left by a checker,
no raw widget repr (`VBox(children=...`): every widget cell leaves the line that says to run
the cell and a saved picture of its key frames, which GitHub and a not-yet-run notebook show.
"""

import json
import re
from pathlib import Path

import pytest

from sdlearn.widgets import RUN_TO_RESTORE, widget_cells

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

PROBLEMS = {
    "a bare matplotlib repr (the figure was not shown)": re.compile(r"^<(Axes|Figure|matplotlib\.[\w.]+)[ :(].*>$|^\[<matplotlib", re.M),
    "a progress bar": re.compile(r"\d+%\|[^|]*\|\s*\d+/\d+"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "a raw widget repr": re.compile(r"^(VBox|HBox|Image|IntSlider|Play)\(children=|\w+\(widget=VBox\("),
}


def text_of(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    return "".join(data.get("text/plain", ""))


def problems(notebook: Path) -> list:
    cells = json.loads(notebook.read_text())["cells"]
    widgets_at = set(widget_cells(cells))
    found = []
    for number, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        for output in cell.get("outputs", []):
            where = f"{notebook.name} cell {number}"
            if output.get("output_type") == "error":
                found.append(f"{where}: an error output ({output.get('ename')})")
                continue
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"{where}: stderr output: {text_of(output)[:120]!r}")
                continue
            text = text_of(output)
            for what, pattern in PROBLEMS.items():
                if pattern.search(text):
                    found.append(f"{where}: {what}: {text[:120]!r}")
            if output.get("output_type") == "execute_result" and text.strip() in ("True", "False", "None"):
                found.append(f"{where}: a stray {text.strip()} (end the line with ; or assign it)")
        if number in widgets_at:
            outputs = cell.get("outputs", [])
            if not any("image/png" in o.get("data", {}) for o in outputs):
                found.append(f"{notebook.name} cell {number}: a widget cell without a saved picture")
            if not any(text_of(o) == RUN_TO_RESTORE for o in outputs):
                found.append(f"{notebook.name} cell {number}: a widget cell without the line that says to run it")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_outputs_are_clean(notebook):
    found = problems(notebook)
    assert not found, "\n".join(found)


def test_the_scan_finds_planted_problems(tmp_path):
    cells = [
        {"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1, "outputs": [
            {"output_type": "stream", "name": "stderr", "text": "UserWarning: something\n"},
            {"output_type": "stream", "name": "stdout", "text": "  0%|          | 0/500 [00:00<?, ?it/s]"},
            {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {"text/plain": "<Axes: xlabel='step'>"}},
            {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {"text/plain": "True"}},
            {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": []},
            {"output_type": "stream", "name": "stdout", "text": "Traceback (most recent call last):\n  File ..."},
        ]},
        {"cell_type": "code", "source": "w = noise_explorer(image)\nw", "metadata": {}, "execution_count": 2, "outputs": [
            {"output_type": "execute_result", "execution_count": 2, "metadata": {},
             "data": {"text/plain": "NoiseExplorer(widget=VBox(children=(SelectionSlider(...),))"}},
        ]},
    ]
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    found = problems(path)
    assert len(found) == 9, found  # six in the first cell; a raw repr, no picture, no "run the cell" in the widget cell
