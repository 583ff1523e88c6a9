"""The committed notebooks are what a learner reads on GitHub: their saved outputs must be clean.

No traceback, no stderr stream (warnings), no frozen progress bar, no bare
`<Axes ...>` / `<Figure ...>` repr where a figure should be, no stray `True` left by a checker.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

PROBLEMS = {
    "a bare matplotlib repr (the figure was not shown)": re.compile(r"^<(Axes|Figure|matplotlib\.[\w.]+)[ :(].*>$|^\[<matplotlib", re.M),
    "a progress bar": re.compile(r"\d+%\|[^|]*\|\s*\d+/\d+"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
}


def text_of(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    data = output.get("data", {})
    return "".join(data.get("text/plain", ""))


def problems(notebook: Path) -> list:
    cells = json.loads(notebook.read_text())["cells"]
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
    ]
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    found = problems(path)
    assert len(found) == 6, found
